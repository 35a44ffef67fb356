"""The local multi-region cluster: every real process of a topology, started and stopped.

Used by `boxoffice up` and by the multi-region integration tests. Order:
Consul -> shard primaries (schema + sample data placed) -> delay proxies ->
streaming replicas -> booking services -> the map into Consul -> gateways.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.auth import TOKEN_SECRET_ENV
from deploy.consul_agent import ConsulAgent
from deploy.delay_proxy import Link
from deploy.postgres import PostgresServer
from deploy.procs import ManagedProcess, chown_for_service, port_open, wait_until
from deploy.services import ShardSpec, python_process, start_booking_service, wait_healthy
from deploy.topology import GATEWAY_SETTINGS, PortPlan, Topology
from region_map import BOOKING_SERVICE, GATEWAY_SERVICE, ConsulMapStore, Region, Shard, ShardMember
from shard_service import schema

Progress = Callable[[str], None]
STATE_MARKER = ".boxoffice-state"


def _quiet(_: str) -> None:
    pass


@dataclass
class ClusterPlan:
    """Every port of the cluster, decided before anything starts."""

    topology: Topology
    consul_http: int
    gateway_ports: dict[str, int]
    service_ports: dict[str, int]
    # Each process's /metrics listener, apart from its public port (on the internal address).
    gateway_metrics_ports: dict[str, int]
    service_metrics_ports: dict[str, int]
    pg_ports: dict[tuple[str, str], int]  # (shard, region) -> port
    service_links: dict[tuple[str, str], Link]  # (from region, to region) -> link
    pg_links: dict[tuple[str, str, str], Link]  # (from region, shard, to region) -> link

    @classmethod
    def make(cls, topology: Topology, ports: PortPlan) -> ClusterPlan:
        regions, shards = topology.region_names, topology.shard_names
        consul = ports.take()
        gateways = {r: ports.take() for r in regions}
        services = {r: ports.take() for r in regions}
        pg = {(s, r): ports.take() for s in shards for r in regions}
        gateway_metrics = {r: ports.take() for r in regions}
        service_metrics = {r: ports.take() for r in regions}
        service_links = {
            (a, b): Link(ports.take(), services[b], topology.latency(a, b))
            for a in regions for b in regions if a != b
        }
        pg_links = {
            (a, s, b): Link(ports.take(), pg[(s, b)], topology.latency(a, b))
            for a in regions for s in shards for b in regions if a != b
        }
        return cls(topology, consul, gateways, services, gateway_metrics, service_metrics, pg,
                   service_links, pg_links)

    def gateway_url(self, region: str) -> str:
        return f"http://127.0.0.1:{self.gateway_ports[region]}"

    def service_url(self, region: str) -> str:
        return f"http://127.0.0.1:{self.service_ports[region]}"

    def metrics_urls(self) -> dict[str, str]:
        """Every process's /metrics URL, by process name."""
        urls = {f"gateway-{r}": f"http://127.0.0.1:{p}/metrics"
                for r, p in self.gateway_metrics_ports.items()}
        urls.update({f"shard_service-{r}": f"http://127.0.0.1:{p}/metrics"
                     for r, p in self.service_metrics_ports.items()})
        return urls

    def rewrites_for(self, region: str) -> dict[str, str]:
        """The simulated network seen from `region`: remote services via delay proxies."""
        return {
            f"127.0.0.1:{self.service_ports[b]}": f"127.0.0.1:{link.listen_port}"
            for (a, b), link in self.service_links.items() if a == region and link.delay_ms > 0
        }

    def map_regions(self) -> list[Region]:
        t = self.topology
        return [
            Region(name=r, gateway_url=self.gateway_url(r), location=t.regions[r],
                   latency_ms=t.latency_table(r))
            for r in t.region_names
        ]

    def map_shards(self) -> list[Shard]:
        return [
            Shard(
                name=s,
                epoch=1,
                primary_region=home,
                members={
                    r: ShardMember(region=r, service_url=f"{self.service_url(r)}/shards/{s}",
                                   db_address=f"127.0.0.1:{self.pg_ports[(s, r)]}")
                    for r in self.topology.region_names
                },
            )
            for s, home in self.topology.shards.items()
        ]


@dataclass
class Cluster:
    topology: Topology
    state_dir: Path
    base_port: int | None = None  # None: free ports from the OS (tests)
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    # Authenticates consistency tokens; every gateway of the cluster shares it.
    token_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    durable: bool | None = None
    map_prefix: str = "boxoffice/"
    progress: Progress = _quiet
    plan: ClusterPlan | None = None
    consul: ConsulAgent | None = None
    databases: dict[tuple[str, str], PostgresServer] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)
    gateways: dict[str, ManagedProcess] = field(default_factory=dict)
    services: dict[str, ManagedProcess] = field(default_factory=dict)
    placements: dict[str, str] = field(default_factory=dict)
    started_at: float = 0.0

    # -- start -----------------------------------------------------------------
    def start(self) -> None:
        self.started_at = time.monotonic()
        t = self.topology
        self.plan = plan = ClusterPlan.make(t, PortPlan(self.base_port))
        self._reset_state_dir()
        os.chmod(self.state_dir, 0o755)
        chown_for_service(self.state_dir)
        durable = bool(t.postgres.get("durable", True)) if self.durable is None else self.durable
        try:
            self._step("consul", lambda: self._start_consul(plan))
            self._step(f"{len(t.shards)} shard primaries", lambda: self._start_primaries(plan, durable))
            self._step("seed data placed across shards", lambda: asyncio.run(self._seed()))
            self._step("cross-region delay proxies", lambda: self._start_proxies(plan))
            self._step(
                f"{len(t.shards) * (len(t.regions) - 1)} streaming replicas",
                lambda: self._start_replicas(plan, durable),
            )
            self._step(f"{len(t.regions)} booking services", lambda: self._start_services(plan))
            self._step("region map loaded into consul", lambda: asyncio.run(self._load_map()))
            self._step(f"{len(t.regions)} gateways", lambda: self._start_gateways(plan))
            self._step("services registered with consul health checks, all passing",
                       lambda: asyncio.run(self._register_services()))
            self._write_state()
        except BaseException:
            self.stop()
            raise

    def _reset_state_dir(self) -> None:
        """Start from an empty state directory; never wipe one this tool did not make."""
        marker = self.state_dir / STATE_MARKER
        if self.state_dir.exists() and any(self.state_dir.iterdir()):
            if not marker.exists():
                raise RuntimeError(
                    f"{self.state_dir} is not empty and was not made by boxoffice; "
                    "choose another BOXOFFICE_STATE_DIR"
                )
            shutil.rmtree(self.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text("state of a local boxoffice cluster; `boxoffice up` replaces it\n")

    def _step(self, what: str, action: Callable[[], object]) -> None:
        started = time.monotonic()
        self.progress(f"  starting {what} ...")
        action()
        self.progress(f"  ok  {what} ({time.monotonic() - started:.1f}s)")

    def _start_consul(self, plan: ClusterPlan) -> None:
        self.consul = ConsulAgent(self.state_dir / "consul" / "data", plan.consul_http)
        self.consul.start()

    def _start_primaries(self, plan: ClusterPlan, durable: bool) -> None:
        for shard, home in self.topology.shards.items():
            server = PostgresServer(
                f"{shard}-{home}", self.state_dir / "pg" / f"{shard}-{home}",
                plan.pg_ports[(shard, home)], durable=durable,
                settings={"synchronous_commit": str(self.topology.postgres.get("synchronous_commit", "on"))},
            )
            server.init_primary()
            self.databases[(shard, home)] = server

    async def _seed(self) -> None:
        primaries = {s: self.databases[(s, h)] for s, h in self.topology.shards.items()}
        await asyncio.gather(*(schema.install(db.dsn, with_sample_data=True) for db in primaries.values()))
        events = await schema.event_ids(next(iter(primaries.values())).dsn)
        shard_names = self.topology.shard_names
        self.placements = {e: shard_names[n % len(shard_names)] for n, e in enumerate(events)}
        for shard, db in primaries.items():
            await schema.keep_only_events(db.dsn, [e for e, s in self.placements.items() if s == shard])

    def _start_proxies(self, plan: ClusterPlan) -> None:
        links = [*plan.service_links.values(), *plan.pg_links.values()]
        proc = python_process(
            "delay-proxy", "deploy.delay_proxy", [link.spec() for link in links],
            self.state_dir / "delay-proxy.log",
        )
        proc.start()
        self.processes.append(proc)

        wait_until(lambda: all(port_open("127.0.0.1", link.listen_port) for link in links),
                   "delay proxies", alive=proc.running)

    def _start_replicas(self, plan: ClusterPlan, durable: bool) -> None:
        for shard, home in self.topology.shards.items():
            primary = self.databases[(shard, home)]
            for region in self.topology.region_names:
                if region == home:
                    continue
                replica = PostgresServer(
                    f"{shard}-{region}", self.state_dir / "pg" / f"{shard}-{region}",
                    plan.pg_ports[(shard, region)], durable=durable,
                )
                replica.init_replica(primary, via_port=plan.pg_links[(region, shard, home)].listen_port)
                self.databases[(shard, region)] = replica

    def _start_services(self, plan: ClusterPlan) -> None:
        for region in self.topology.region_names:
            specs = [
                ShardSpec(
                    shard, self.databases[(shard, region)].dsn,
                    "primary" if home == region else "replica", home,
                    pool_size=20 if home == region else 10,
                )
                for shard, home in self.topology.shards.items()
            ]
            proc = start_booking_service(
                region, plan.service_ports[region], specs,
                self.state_dir / f"shard_service-{region}.log", admin_token=self.admin_token,
                metrics_port=plan.service_metrics_ports[region],
            )
            self.services[region] = proc
            self.processes.append(proc)

    async def _load_map(self) -> None:
        assert self.plan is not None and self.consul is not None
        store = ConsulMapStore(port=self.consul.http_port, prefix=self.map_prefix)
        try:
            for region in self.plan.map_regions():
                await store.put_region(region, 0)
            for shard in self.plan.map_shards():
                await store.put_shard(shard, 0)
            for event_id, shard_name in self.placements.items():
                await store.place_event(event_id, shard_name, 0)
        finally:
            await store.close()

    def copy_instance_id(self, shard: str, region: str) -> str:
        """The registry id of the booking service's instance for one shard copy."""
        return f"{BOOKING_SERVICE}-{region}-{shard}"

    async def _register_services(self) -> None:
        """Every gateway, and every shard copy's booking service (one instance per copy,
        checked on the copy's /api/ready: its database answers in the right role), with
        an HTTP health check in Consul; then wait until every check passes (a new check
        starts critical) and every gateway's health view says so, so that no copy
        starts out demoted."""
        assert self.plan is not None and self.consul is not None
        store = ConsulMapStore(port=self.consul.http_port, prefix=self.map_prefix)
        wanted: dict[str, set[str]] = {BOOKING_SERVICE: set(), GATEWAY_SERVICE: set()}
        try:
            for shard in self.plan.map_shards():
                for region, member in shard.members.items():
                    instance = self.copy_instance_id(shard.name, region)
                    role = "primary" if region == shard.primary_region else "replica"
                    await store.register_service(
                        BOOKING_SERVICE, instance, "127.0.0.1", self.plan.service_ports[region],
                        [f"region={region}", f"shard={shard.name}", f"role={role}"],
                        f"{member.service_url}/api/ready", url=member.service_url,
                    )
                    wanted[BOOKING_SERVICE].add(instance)
            for region in self.topology.region_names:
                port = self.plan.gateway_ports[region]
                await store.register_service(
                    GATEWAY_SERVICE, f"{GATEWAY_SERVICE}-{region}", "127.0.0.1", port,
                    [f"region={region}"], f"http://127.0.0.1:{port}/api/health",
                    url=self.plan.gateway_url(region),
                )
                wanted[GATEWAY_SERVICE].add(f"{GATEWAY_SERVICE}-{region}")
        finally:
            await store.close()
        await self._wait_passing(wanted)

    async def _wait_passing(self, wanted: dict[str, set[str]], timeout: float = 30.0) -> None:
        """Until the instances pass their checks in Consul and no gateway sees a failing one."""
        assert self.consul is not None
        store = ConsulMapStore(port=self.consul.http_port, prefix=self.map_prefix)
        try:
            async with asyncio.timeout(timeout):
                for service, instances in wanted.items():
                    index = 0
                    while True:  # blocking queries: wakes at each change of health
                        index, passing = await store.watch_healthy_instances(service, index, 5)
                        if instances <= {i.instance_id for i in passing}:
                            break
        finally:
            await store.close()
        await self._wait_gateways_ready(lambda _, doc: doc.get("failingServices") == [],
                                        "still sees a failing service")

    def _start_gateways(self, plan: ClusterPlan) -> None:
        topology_file = self.state_dir / "topology.json"
        topology_file.write_text(json.dumps({
            "client_regions": [
                {"prefix": str(rule.network), "region": rule.region}
                for rule in self.topology.client_regions
            ]
        }))
        procs = {}
        for region in self.topology.region_names:
            args = [
                "--region", region,
                "--port", str(plan.gateway_ports[region]),
                "--consul", f"127.0.0.1:{plan.consul_http}",
                "--map-prefix", self.map_prefix,
                "--client-regions", str(topology_file),
                "--rewrites", json.dumps(plan.rewrites_for(region)),
                "--metrics-port", str(plan.gateway_metrics_ports[region]),
            ]
            for key, value in self.topology.gateway.items():
                args += [GATEWAY_SETTINGS[key], str(value)]
            proc = python_process(
                f"gateway[{region}]", "gateway", args, self.state_dir / f"gateway-{region}.log",
                env={"BOXOFFICE_ADMIN_TOKEN": self.admin_token,
                     TOKEN_SECRET_ENV: self.token_secret},
            )
            proc.start()
            procs[region] = proc
            self.processes.append(proc)
        for region, proc in procs.items():
            wait_healthy(plan.gateway_url(region), proc, f"gateway {region}")
            self.gateways[region] = proc
        asyncio.run(self._wait_gateways_ready(lambda status, _: status == 200,
                                              "has not loaded the region map"))

    async def _wait_gateways_ready(
        self, ready: Callable[[int, dict[str, object]], bool], what: str, timeout: float = 30.0
    ) -> None:
        """Poll every gateway's /api/ready until `ready(status, document)` holds."""
        import aiohttp

        assert self.plan is not None
        deadline = time.monotonic() + timeout
        auth = {"Authorization": f"Bearer {self.admin_token}"}  # the detail is for operators
        async with aiohttp.ClientSession(headers=auth) as session:
            for region in self.topology.region_names:
                url = f"{self.plan.gateway_url(region)}/api/ready"
                while True:
                    async with session.get(url) as resp:
                        doc = await resp.json()
                        if ready(resp.status, doc):
                            break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"gateway {region} {what} after {timeout:.0f}s: {doc}")
                    await asyncio.sleep(0.05)  # poll interval

    def _write_state(self) -> None:
        assert self.plan is not None and self.consul is not None
        state = {
            "pid": os.getpid(),
            "consul": self.consul.address,
            "mapPrefix": self.map_prefix,
            "adminToken": self.admin_token,
            "gateways": {r: self.plan.gateway_url(r) for r in self.topology.region_names},
            "metrics": self.plan.metrics_urls(),
            # Operator tools (the load test's invariant check) read the primaries directly.
            "primaries": {
                shard: self.databases[(shard, home)].dsn
                for shard, home in self.topology.shards.items()
            },
        }
        path = self.state_dir / "cluster.json"
        path.write_text(json.dumps(state, indent=2))
        os.chmod(path, 0o600)

    # -- faults (tests and drills) ------------------------------------------------
    def stop_service(self, region: str) -> None:
        """Stop one region's booking service (every shard copy it serves goes dark)."""
        self.services[region].stop()

    def start_service(self, region: str, timeout: float = 30.0) -> None:
        """Start a stopped booking service again and wait until it answers and passes
        its health check in every gateway's view."""
        assert self.plan is not None
        proc = self.services[region]
        proc.start()
        wait_healthy(self.plan.service_url(region), proc, f"booking service {region}", timeout)
        # ... and until Consul's checks of its copies and every gateway see them pass again.
        copies = {self.copy_instance_id(shard, region) for shard in self.topology.shard_names}
        asyncio.run(self._wait_passing({BOOKING_SERVICE: copies}, timeout))

    # -- stop ------------------------------------------------------------------
    def stop(self) -> None:
        """Stop everything this cluster started, newest first. Safe to call twice."""
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        for db in self.databases.values():
            db.stop()
        if self.consul is not None:
            self.consul.stop()

    def pids(self) -> list[int]:
        pids = [p.pid for p in self.processes if p.pid]
        pids += [db.process.pid for db in self.databases.values() if db.process and db.process.pid]
        if self.consul and self.consul.process and self.consul.process.pid:
            pids.append(self.consul.process.pid)
        return pids
