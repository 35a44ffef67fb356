"""Failover drills: a fault under booking load, then a report of what clients saw.

`run_drill(cluster, DrillSettings(shard, kind, manual))`; `boxoffice drill failover`
runs it against the cluster `boxoffice up` started (its cluster.json), the tests and
`loadtest.failover` in-process (`DrillCluster.from_cluster`). In order:

1. full strength first: every copy of every shard running in its map role (standbys
   streaming) and passing its Consul check; one fresh event per shard (large capacity,
   created through a gateway's operator API).
2. load: clients book one ticket at a time on every shard's event through every
   gateway, each booking with its own `clientReference` (one run prefix), each client
   from its own loopback address (a gateway's rate limit is per client address) at a
   steady rate; every answer is recorded with when it was sent and answered.
3. the fault, at a recorded instant: `kill-primary` SIGKILLs the node agent of the
   shard's primary's host (the host dies: its Postgres servers and booking service die
   with their agent); `kill-zone` every host of that zone; `kill-region` every host of
   that region; `switchover` a planned switchover to the first streaming standby of the
   synchronous set (failover/switchover.py). With `manual` the controllers are paused
   (SIGSTOP) for the drill and the drill itself detects the dead primary (its node
   agent's probe) and runs the promotion primitive, to the candidate the controller
   would choose.
4. recovery: the map names a new primary (the shard record's epoch grows); every
   gateway's map reaches that index (`/api/ready` with the operator token); every
   shard has a confirmed booking answered after the change; load goes on a little.
5. full strength again: what was killed is restarted (in-process: the launcher's
   `restart_dead`; against `boxoffice up`: its own loop restarts dead children within
   a second), the controllers resumed, and the drill waits for every copy as in 1.
6. the databases: on each shard's primary, every confirmed booking of the run exists,
   sold + remaining = capacity for every tier, no reference on two bookings.

The report: time to detect (the controller's detection, or the drill's own probe with
`manual`; the first failed booking is given too), to promote (fault to the map
change), to the map at every gateway, write unavailability per shard (last success
before the first failure to the first success after it) and the longest gap between
two successes from the fault on (held writes fail nothing but still pause), client
errors by kind, confirmed and missing bookings, oversold tiers, duplicated references.
`ok` only when nothing confirmed is missing, nothing is oversold or duplicated, and
the fault was recovered from.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from failover.agents import AgentError, CopyStatus, NodeAgents
from failover.promote import promote
from region_map import BOOKING_SERVICE, ConsulMapStore, MapError, NotFound, Shard, passing_by_url

if TYPE_CHECKING:
    from deploy.cluster import Cluster

KINDS = ("kill-primary", "kill-zone", "kill-region", "switchover")
RATE_LIMITED = "429 rate-limited"
REPORT_KIND = "drill-"  # reports kept beside the operation journals, for the operator console
ANSWER_TIMEOUT = 40.0  # one booking, as a client waits (the gateway rides through ~10 s)


class DrillError(Exception):
    """The drill could not run (or could not finish): the cluster was not at full
    strength, a kind is unavailable, recovery did not come within the timeout."""


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


class Faults(Protocol):
    """How a drill acts on the cluster's processes."""

    def kill_host(self, host: str) -> None:
        """SIGKILL the host's node agent (its Postgres servers and booking service die
        with it)."""

    def restart(self) -> list[str]:
        """Start again what the drill killed (names); [] when the launcher does it."""

    def pause_controllers(self, paused: bool) -> list[str]:
        """SIGSTOP (True) or SIGCONT (False) every failover controller; their names."""


class Auditor(Protocol):
    async def audit(self, shard: str, copy: str, event_id: str, prefix: str) -> ShardAudit: ...


@dataclass
class ShardAudit:
    """One shard primary's database after the drill, for the run's bookings."""

    bookings: dict[str, str]  # id -> status, of the run's references
    oversold: list[dict[str, Any]]  # tiers with sold + remaining != capacity or remaining < 0
    duplicated: list[dict[str, Any]]  # references on more than one booking


class DatabaseAuditor:
    """Reads each shard's primary database directly (operator tooling, like the load
    test's invariant check): `dsns[(shard, copy)]`."""

    def __init__(self, dsns: Mapping[tuple[str, str], str]) -> None:
        self.dsns = dsns

    async def audit(self, shard: str, copy: str, event_id: str, prefix: str) -> ShardAudit:
        import asyncpg

        from shard_service.inventory import audit_inventory

        conn = await asyncpg.connect(self.dsns[(shard, copy)], timeout=10)
        try:
            audit = await audit_inventory(conn, event_id=event_id, reference_prefix=prefix)
        finally:
            await conn.close()
        return ShardAudit(dict(audit.bookings),
                          [{"tier": t.tier_id, "capacity": t.capacity, "sold": t.sold,
                            "remaining": t.remaining} for t in audit.violations],
                          [dict(d) for d in audit.duplicate_references])


class ProcessFaults:
    """Faults by signals to the local cluster's processes, given how to find them."""

    def __init__(self, agent_pid: Callable[[str], int | None],
                 controller_pids: Callable[[], dict[str, int]],
                 restart: Callable[[], list[str]] | None = None) -> None:
        self.agent_pid = agent_pid
        self.controller_pids = controller_pids
        self._restart = restart

    def kill_host(self, host: str) -> None:
        pid = self.agent_pid(host)
        if pid is None:
            raise DrillError(f"no node agent process found for host {host}")
        os.kill(pid, signal.SIGKILL)

    def restart(self) -> list[str]:
        return self._restart() if self._restart else []

    def pause_controllers(self, paused: bool) -> list[str]:
        names = []
        for name, pid in self.controller_pids().items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP if paused else signal.SIGCONT)
                names.append(name)
        return names


def _pids_by_argv(match: Callable[[list[str]], bool]) -> list[int]:
    """The processes whose command line satisfies `match` (/proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if match(argv):
            found.append(int(entry.name))
    return found


@dataclass
class DrillCluster:
    """What a drill reaches: gateways, Consul, controllers, the token, faults, audit."""

    gateways: dict[str, str]  # region -> base URL
    admin_token: str
    consul_host: str
    consul_port: int
    map_prefix: str
    controllers: dict[str, str]  # region -> status URL
    faults: Faults
    auditor: Auditor

    @classmethod
    def from_cluster(cls, cluster: Cluster) -> DrillCluster:
        """A cluster this process started (tests, loadtest.failover)."""
        assert cluster.plan is not None and cluster.consul is not None
        plan = cluster.plan

        def agent_pid(host: str) -> int | None:
            proc = cluster.agents.get(host)
            return proc.pid if proc is not None and proc.running() else None

        def controller_pids() -> dict[str, int]:
            return {f"controller[{r}]": p.pid for r, p in cluster.controllers.items()
                    if p.pid is not None and p.running()}

        return cls(
            gateways={r: plan.gateway_url(r) for r in cluster.topology.region_names},
            admin_token=cluster.admin_token, consul_host="127.0.0.1",
            consul_port=cluster.consul.http_port, map_prefix=cluster.map_prefix,
            controllers={r: plan.controller_url(r) for r in cluster.controllers},
            faults=ProcessFaults(agent_pid, controller_pids, cluster.restart_dead),
            auditor=DatabaseAuditor({k: db.dsn for k, db in cluster.databases.items()}),
        )

    @classmethod
    def from_state(cls, state_dir: Path, state: dict[str, Any]) -> DrillCluster:
        """The cluster `boxoffice up` runs (its cluster.json); the `up` process restarts
        what the drill kills, within about a second."""
        def agent_pid(host: str) -> int | None:
            config = str(state_dir / f"node-agent-{host.replace('/', '-')}.json")
            pids = _pids_by_argv(lambda argv: "node_agent" in argv and config in argv)
            return pids[0] if pids else None

        def controller_pids() -> dict[str, int]:
            found = {}
            for region, url in (state.get("controllers") or {}).items():
                port = url.rsplit(":", 1)[-1]
                pids = _pids_by_argv(lambda argv, port=port: "failover" in argv and "--port" in argv
                                     and argv[argv.index("--port") + 1:][:1] == [port])
                if pids:
                    found[f"controller[{region}]"] = pids[0]
            return found

        host, _, port = str(state["consul"]).rpartition(":")
        dsns = {}
        for key, dsn in (state.get("copies") or {}).items():
            shard, _, copy = key.partition("@")
            dsns[(shard, copy)] = dsn
        return cls(
            gateways=dict(state["gateways"]), admin_token=str(state["adminToken"]),
            consul_host=host, consul_port=int(port), map_prefix=str(state.get("mapPrefix", "boxoffice/")),
            controllers=dict(state.get("controllers") or {}),
            faults=ProcessFaults(agent_pid, controller_pids),
            auditor=DatabaseAuditor(dsns),
        )


# -- load ---------------------------------------------------------------------------------

@dataclass
class Attempt:
    shard: str
    gateway: str
    sent: float  # monotonic
    answered: float
    kind: str  # "" for a confirmed booking (201, or 200 for a replay), else the error kind

    @property
    def ok(self) -> bool:
        return not self.kind


@dataclass
class Load:
    """Booking clients on every shard's event through every gateway."""

    gateways: dict[str, str]
    events: dict[str, dict[str, Any]]  # shard -> event document
    prefix: str
    rate: float
    attempts: list[Attempt] = field(default_factory=list)
    confirmed: dict[str, list[str]] = field(default_factory=dict)  # shard -> booking ids
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self, clients: dict[str, int]) -> None:
        """`clients[shard]` clients per gateway on that shard's event."""
        n = 0
        for shard, per_gateway in clients.items():
            for region in self.gateways:
                for _ in range(per_gateway):
                    n += 1
                    address = f"127.0.{1 + n // 250}.{1 + n % 250}"  # its own rate-limit bucket
                    self.tasks.append(asyncio.create_task(self._client(shard, region, address)))

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    async def wait_for(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise DrillError(f"timed out waiting for {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def confirmed_after(self, shard: str, instant: float) -> bool:
        return any(a.ok and a.shard == shard and a.answered > instant for a in self.attempts)

    def answers_since(self, shard: str, instant: float) -> str:
        """What the shard's clients were answered since `instant`, by gateway and kind,
        for an error message: `east: 12 x 503 not-confirmed; west: no answer`."""
        parts = []
        for region in self.gateways:
            kinds = collections.Counter(a.kind or "confirmed" for a in self.attempts
                                        if a.shard == shard and a.gateway == region
                                        and a.answered > instant)
            parts.append(f"{region}: " + (", ".join(f"{n} x {k}" for k, n in kinds.most_common())
                                          or "no answer"))
        return "; ".join(parts)

    async def _client(self, shard: str, region: str, address: str) -> None:
        event = self.events[shard]
        url = f"{self.gateways[region]}/api/bookings"
        connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            next_at = time.monotonic()
            while not self.stop.is_set():
                body = {"eventId": event["id"], "clientReference": f"{self.prefix}{uuid.uuid4()}",
                        "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 1}]}
                sent = time.monotonic()
                kind, booking = await self._book(session, url, body)
                self.attempts.append(Attempt(shard, region, sent, time.monotonic(), kind))
                if booking:
                    self.confirmed.setdefault(shard, []).append(booking)
                self._changed.set()
                next_at = max(next_at + 1 / self.rate, time.monotonic() - 1)
                with contextlib.suppress(TimeoutError):  # the client's pace, or stop
                    await asyncio.wait_for(self.stop.wait(), max(0.0, next_at - time.monotonic()))

    @staticmethod
    async def _book(session: aiohttp.ClientSession, url: str,
                    body: dict[str, Any]) -> tuple[str, str | None]:
        try:
            async with session.post(url, json=body,
                                    timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT)) as resp:
                doc = await resp.json(content_type=None)
                if resp.status in (200, 201):
                    return "", str(doc["id"])
                kind = str((doc or {}).get("type", "")).rsplit("/", 1)[-1] if isinstance(doc, dict) else ""
                return f"{resp.status} {kind}".strip(), None
        except TimeoutError:
            return "client timeout", None
        except (aiohttp.ClientError, ValueError) as exc:
            return type(exc).__name__, None


def write_figures(attempts: list[Attempt], fault_at: float) -> dict[str, Any]:
    """Per shard: attempts, confirmed, errors; `unavailableSeconds`: from the last
    success answered before the first failure to the first success answered after it
    (None without a failure); `longestGapSeconds`: the longest time between two
    successes answered, counting gaps that end after the fault."""
    shards: dict[str, Any] = {}
    for shard in sorted({a.shard for a in attempts}):
        mine = sorted((a for a in attempts if a.shard == shard), key=lambda a: a.answered)
        successes = [a.answered for a in mine if a.ok]
        failures = [a for a in mine if not a.ok and a.kind != RATE_LIMITED and a.answered >= fault_at]
        unavailable = first_failure = None
        if failures:
            first = failures[0]
            first_failure = first.answered - fault_at
            before = [t for t in successes if t <= first.answered]
            after = [t for t in successes if t > first.answered]
            if before and after:
                unavailable = after[0] - before[-1]
        gaps = [b - a for a, b in itertools.pairwise(successes) if b > fault_at]
        shards[shard] = {
            "attempts": len(mine), "confirmed": len(successes), "failed": len(failures),
            "firstFailureSeconds": _r(first_failure), "unavailableSeconds": _r(unavailable),
            "longestGapSeconds": _r(max(gaps) if gaps else None),
        }
    return shards


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _wall(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_wall(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- the drill --------------------------------------------------------------------------------

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
        self.notes: list[str] = []

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

    async def moved_on(self, before: Shard) -> tuple[Shard, int, float]:
        """Until the shard record names another primary at a higher epoch: it, its modify
        index and when it was seen (blocking queries on the record)."""
        deadline = time.monotonic() + self.s.timeout
        index = 0
        while True:
            try:
                shard, index = await self.store.read_shard(before.name)
            except MapError:
                shard = before
            if shard.epoch > before.epoch:
                return shard, index, time.monotonic()
            if time.monotonic() > deadline:
                raise DrillError(f"{before.name}: no new primary {self.s.timeout:.0f}s after the fault")
            await asyncio.sleep(0.01)  # poll interval

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
                detected = _parse_wall(record.get("detectedAt"))
                if record.get("shard") == shard and record.get("outcome") in ("promoted", "finished") \
                        and detected is not None and detected >= fault_wall - 1:
                    found = record
        return found

    # -- manual recovery --------------------------------------------------------------------
    async def manual_failover(self, before: Shard) -> tuple[float, dict[str, Any]]:
        """Detect the dead primary by probing its node agent, then promote the running
        standby of the synchronous set with the highest (timeline, position)."""
        while True:
            try:
                status = await self.agents.copy_status(before.primary_copy, before.name)
                down = not (status.running and status.role == "primary")
            except AgentError:
                down = True
            if down:
                break
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
        for s in (self.shards or {}).values():
            for key, member in s.members.items():
                if member.region == primary.region and (self.s.kind == "kill-region"
                                                        or member.zone == primary.zone):
                    hosts.add(key)
        return sorted(hosts)

    shards: dict[str, Shard] | None = None

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
        if s.kind == "switchover":
            try:
                from failover.switchover import switchover
            except ImportError:
                raise DrillError("switchover drills need failover/switchover.py, not present") from None
        self.say(f"drill {s.kind} on {s.shard} ({'manual' if s.manual else 'automatic'}): "
                 "waiting for full strength ...")
        self.shards = await self.full_strength()
        if s.shard not in self.shards:
            raise DrillError(f"no shard named {s.shard!r}")
        before = self.shards[s.shard]
        hosts = [] if s.kind == "switchover" else self.hosts_for(before)
        events = await self.create_events(list(self.shards))
        prefix = f"drill-{uuid.uuid4().hex[:8]}-"
        load = Load(self.c.gateways, events, prefix, s.rate_per_client)
        clients = {name: s.clients_per_gateway if name == s.shard else s.other_clients_per_gateway
                   for name in self.shards}
        load.start({k: v for k, v in clients.items() if v > 0})
        self.say(f"  load: {sum(clients.values()) * len(self.c.gateways)} clients through "
                 f"{len(self.c.gateways)} gateways, {s.rate_per_client:g} bookings/s each")
        paused: list[str] = []
        detected_at = manual_report = switch_report = None
        faulted = False
        try:
            started = time.monotonic()
            await load.wait_for(lambda: all(load.confirmed.get(n) for n in clients if clients[n])
                                and time.monotonic() - started >= s.warmup_seconds,
                                s.timeout, "bookings confirmed on every shard before the fault")
            if s.manual:
                paused = self.c.faults.pause_controllers(True)
                self.say(f"  manual: paused {', '.join(paused) or 'no controllers'}")
            fault_at, fault_wall = time.monotonic(), time.time()
            if s.kind == "switchover":
                target = await self.switchover_target(before)
                self.say(f"  fault: planned switchover of {s.shard} to {target}")
                switch_task = asyncio.create_task(switchover(self.store, self.agents, s.shard, target))
            else:
                for host in hosts:
                    faulted = True
                    self.c.faults.kill_host(host)
                self.say(f"  fault: SIGKILL node agent of {', '.join(hosts)} at {_wall(fault_wall)}")
            if s.manual and s.kind != "switchover":
                detected_at, manual_report = await self.manual_failover(before)
            after, index, changed_at = await self.moved_on(before)
            self.say(f"  map: {s.shard} primary {before.primary_copy} -> {after.primary_copy} "
                     f"(epoch {after.epoch}) {changed_at - fault_at:.2f}s after the fault")
            per_gateway = await self.map_at_gateways(index, fault_at)
            if s.kind == "switchover":
                switch_report = (await switch_task).to_json()
            try:
                await load.wait_for(lambda: all(load.confirmed_after(n, changed_at)
                                                for n in clients if clients[n]),
                                    s.timeout, "a confirmed booking on every shard after the map change")
            except DrillError as exc:
                lacking = [n for n in clients if clients[n] and not load.confirmed_after(n, changed_at)]
                copies = [await self.copies_now(n) for n in lacking]
                raise DrillError(f"{exc}: no booking confirmed on " + "; ".join(
                    f"{n} (answers since the change: {load.answers_since(n, changed_at)}; "
                    f"copies now: {c})" for n, c in zip(lacking, copies, strict=True))) from None
            recovered_at = time.monotonic()
            resumed = time.monotonic()
            await load.wait_for(lambda: time.monotonic() - resumed >= s.after_seconds,
                                s.after_seconds + 5, "load after recovery")
        except BaseException:
            if faulted:  # a failed drill still leaves the cluster to come back to full strength
                restarted = self.c.faults.restart()
                self.say(f"  drill failed; restarted {', '.join(restarted) or 'nothing here'}")
            raise
        finally:
            await load.finish()
            if paused:
                self.c.faults.pause_controllers(False)
        self.say(f"  recovered; {sum(len(v) for v in load.confirmed.values())} bookings confirmed; "
                 "restoring full strength ...")
        restarted = self.c.faults.restart()
        final = await self.full_strength()
        restored_at = time.monotonic()
        record = None if s.manual else await self.controller_record(s.shard, fault_wall)
        report = await self.report(before, after, final, hosts, load, fault_at, fault_wall,
                                   changed_at, per_gateway, recovered_at, restored_at, detected_at,
                                   manual_report, switch_report, record, restarted, paused)
        return report

    async def report(self, before: Shard, after: Shard, final: dict[str, Shard], hosts: list[str],
                     load: Load, fault_at: float, fault_wall: float, changed_at: float,
                     per_gateway: dict[str, float], recovered_at: float, restored_at: float,
                     detected_at: float | None, manual_report: dict[str, Any] | None,
                     switch_report: dict[str, Any] | None, record: dict[str, Any] | None,
                     restarted: list[str], paused: list[str]) -> dict[str, Any]:
        s = self.s
        figures = write_figures(load.attempts, fault_at)
        errors = collections.Counter(a.kind for a in load.attempts if not a.ok)
        audits: dict[str, Any] = {}
        lost = oversold = duplicated = 0
        for name, shard in final.items():
            event = load.events.get(name)
            if event is None:
                continue
            audit = await self.c.auditor.audit(name, shard.primary_copy, event["id"], load.prefix)
            confirmed = load.confirmed.get(name, [])
            missing = [b for b in confirmed if audit.bookings.get(b) != "confirmed"]
            lost += len(missing)
            oversold += len(audit.oversold)
            duplicated += len(audit.duplicated)
            audits[name] = {"primary": shard.primary_copy, "confirmed": len(confirmed),
                            "found": len(confirmed) - len(missing), "missing": len(missing),
                            "missingIds": missing[:10], "oversold": audit.oversold,
                            "duplicatedReferences": audit.duplicated}
        if detected_at is not None:
            detect, detected_by = detected_at - fault_at, "the drill's probe of the primary's node agent"
        elif record is not None and (wall := _parse_wall(record.get("detectedAt"))) is not None:
            detect, detected_by = wall - fault_wall, f"controller ({record.get('kind', 'failover')})"
        else:
            detect, detected_by = None, None
        drilled = figures.get(s.shard, {})
        if detect is None and drilled.get("firstFailureSeconds") is not None:
            detect, detected_by = drilled["firstFailureSeconds"], "the first failed booking"
        gaps = [f["longestGapSeconds"] for f in figures.values() if f["longestGapSeconds"] is not None]
        ok = lost == 0 and oversold == 0 and duplicated == 0
        return {
            "shard": s.shard, "kind": s.kind, "mode": "manual" if s.manual else "automatic",
            "startedAt": _wall(fault_wall), "faultHosts": hosts,
            "oldPrimary": before.primary_copy, "newPrimary": after.primary_copy,
            "oldEpoch": before.epoch, "newEpoch": after.epoch,
            "times": {
                "detectSeconds": _r(detect), "detectedBy": detected_by,
                "promoteSeconds": _r(changed_at - fault_at),
                "mapAtEveryGatewaySeconds": _r(max(per_gateway.values())),
                "mapAtGatewaySeconds": {k: _r(v) for k, v in per_gateway.items()},
                "writesBackSeconds": _r(recovered_at - fault_at),
                "fullStrengthSeconds": _r(restored_at - fault_at),
                "controller": None if record is None else {
                    k: record.get(k) for k in ("confirmSeconds", "promoteSeconds", "totalSeconds",
                                               "detectedAt", "promotedAt")},
            },
            "writes": {"perShard": figures, "longestGapSeconds": _r(max(gaps) if gaps else None)},
            "clientErrors": dict(errors.most_common()),
            "bookings": {"confirmed": sum(len(v) for v in load.confirmed.values()), "missing": lost,
                         "oversold": oversold, "duplicatedReferences": duplicated, "perShard": audits},
            "restarted": restarted, "pausedControllers": paused,
            "promotion": manual_report or switch_report,
            "ok": ok,
        }


async def run_drill(cluster: DrillCluster, settings: DrillSettings,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one drill; its report (see the module docstring). Raises DrillError."""
    drill = _Drill(cluster, settings, progress or (lambda _: None))
    try:
        report = await drill.run()
        await drill.keep(report)
        return report
    finally:
        await drill.close()


def format_report(report: dict[str, Any]) -> str:
    """The drill's report as text."""
    t, w, b = report["times"], report["writes"], report["bookings"]

    def sec(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}s"
    lines = [
        f"drill {report['kind']} on {report['shard']} ({report['mode']}), {report['startedAt']}: "
        f"{'OK' if report['ok'] else 'FAILED'}",
        f"  fault: {', '.join(report['faultHosts']) or 'planned switchover'}; primary "
        f"{report['oldPrimary']} -> {report['newPrimary']} "
        f"(epoch {report['oldEpoch']} -> {report['newEpoch']})",
        f"  detect {sec(t['detectSeconds'])} ({t['detectedBy'] or 'not measured'}), promote (map change) "
        f"{sec(t['promoteSeconds'])}, map at every gateway {sec(t['mapAtEveryGatewaySeconds'])}, "
        f"writes back {sec(t['writesBackSeconds'])}, full strength {sec(t['fullStrengthSeconds'])}",
    ]
    if t.get("controller"):
        c = t["controller"]
        lines.append(f"  controller: confirm {sec(c.get('confirmSeconds'))}, promote "
                     f"{sec(c.get('promoteSeconds'))}, detection to promoted {sec(c.get('totalSeconds'))}")
    lines.append("  writes:   SHARD        ATTEMPTS  CONFIRMED  FAILED  UNAVAILABLE  LONGEST GAP")
    for shard, f in w["perShard"].items():
        lines.append(f"            {shard:<12} {f['attempts']:>8}  {f['confirmed']:>9}  {f['failed']:>6}  "
                     f"{sec(f['unavailableSeconds']):>11}  {sec(f['longestGapSeconds']):>11}")
    errors = ", ".join(f"{k}: {v}" for k, v in report["clientErrors"].items()) or "none"
    lines.append(f"  client errors: {errors}")
    lines.append(f"  bookings: {b['confirmed']} confirmed, {b['missing']} missing, {b['oversold']} oversold "
                 f"tiers, {b['duplicatedReferences']} duplicated references")
    if report["restarted"]:
        lines.append(f"  restarted: {', '.join(report['restarted'])}")
    return "\n".join(lines)


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
