"""The local multi-region cluster: every real process of a topology, started and stopped.

Used by `boxoffice up` and by the multi-region integration tests. One machine stands in
for many hosts: every zone of a region that holds a copy of some shard is a host, with
its own node agent (which owns the host's Postgres servers and its booking service,
and keeps them running in the roles the region map gives them) and its own booking
service. Order:

Consul -> shard primaries (schema, epoch row, sample data placed) -> delay proxies ->
streaming replicas (pg_basebackup through the simulated network) -> synchronous
standby sets -> the servers handed over (stopped) -> the map into Consul -> one node
agent per host (each starts its servers in their map roles and its booking service)
-> gateways -> everything registered with Consul health checks, all passing -> one
failover controller per region, when the topology enables them (stopped first).

On the host (issue 21): the state directory is ours alone (`prepare_state_dir`: one
another user made, or may write, is refused; root's is 0711 so `postgres` reaches its
own 0700 `pg/` and `logs/`); every secret file is written private from its first byte
(procs.write_private: cluster.json 0600; the node agents' configs, which carry the
database passwords and the operator token, 0640 root:postgres; the booking services'
passfile 0600 to the user they run as). When root, node agents run as `postgres` (their
servers and booking services with them), every other process as `boxoffice`; the
launcher opens only logs in directories it alone writes.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import internal_auth
from common.auth import ADMIN_TOKEN_ENV, TOKEN_SECRET_ENV
from deploy import prometheus
from deploy.consul_acl import bootstrap as bootstrap_consul_acl
from deploy.consul_agent import ConsulAgent, new_token
from deploy.delay_proxy import CONTROL_KEY_ENV, Link
from deploy.postgres import APP_ROLE, Credentials, PostgresServer, restrict_app_role
from deploy.procs import (
    ManagedProcess,
    port_open,
    private_dir,
    python_command,
    python_user,
    service_user,
    wait_until,
    write_private,
)
from deploy.prometheus import Prometheus
from deploy.services import ShardSpec, python_process, wait_healthy
from deploy.topology import GATEWAY_SETTINGS, Host, PortPlan, Topology
from failover import holddown
from region_map import (
    BOOKING_SERVICE,
    CONSUL_TOKEN_ENV,
    FIRST_ZONE,
    GATEWAY_SERVICE,
    NODE_AGENT_SERVICE,
    ConsulMapStore,
    Region,
    Shard,
    ShardMember,
    copy_key,
)
from shard_service import schema

Progress = Callable[[str], None]
STATE_MARKER = ".boxoffice-state"
LOCAL = "127.0.0.1"
PASSFILE = "pgpass"  # the booking services' database password (PGPASSFILE)


class StateDirError(RuntimeError):
    """A state directory we must not use (another user's, or writable by others)."""


def check_state_dir(path: Path) -> None:
    """Refuse a state directory another user could have prepared or can change: it must
    be a real directory (not a link), ours, and writable by nobody else."""
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"{path} is not a directory (a link?): refusing it as the state directory")
    if st.st_uid != os.geteuid():
        raise StateDirError(f"{path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}): another "
                            "user may have made it; remove it or choose another --state-dir")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateDirError(f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}): "
                            "refusing it as the state directory")


def prepare_state_dir(path: Path) -> None:
    """Create the state directory (and missing parents, 0700 when ours alone), or accept
    an existing one after `check_state_dir`; then set its mode: 0711 when we are root
    (the `postgres` user traverses it to its own 0700 subdirectories), else 0700."""
    mode = 0o711 if os.geteuid() == 0 else 0o700
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made meanwhile: checked below like any other
    check_state_dir(path)
    os.chmod(path, mode, follow_symlinks=False)


def _quiet(_: str) -> None:
    pass


def server_name(shard: str, copy: str) -> str:
    """A copy's Postgres server name: its cluster_name, and the application_name the
    primary's synchronous standby set names it by (`shard-1-us-east-b`)."""
    return f"{shard}-{copy.replace('/', '-')}"


@dataclass
class ClusterPlan:
    """Every port of the cluster, decided before anything starts."""

    topology: Topology
    consul_http: int
    gateway_ports: dict[str, int]  # region -> port
    gateway_metrics_ports: dict[str, int]
    service_ports: dict[str, int]  # host key -> port (one booking service per host)
    service_metrics_ports: dict[str, int]
    agent_ports: dict[str, int]  # host key -> port (one node agent per host)
    pg_ports: dict[tuple[str, str], int]  # (shard, copy key) -> port
    service_links: dict[tuple[str, str], Link]  # (gateway region, host key) -> link
    pg_links: dict[tuple[str, str, str], Link]  # (from host key, shard, copy key) -> link
    controller_ports: dict[str, int] = field(default_factory=dict)  # region -> status port
    # The control plane's links, so a host can be cut off from it (Cluster.cut):
    consul_links: dict[str, Link] = field(default_factory=dict)  # host -> Consul (its agent, service)
    check_links: dict[str, Link] = field(default_factory=dict)  # Consul's checks -> host's service
    agent_links: dict[str, Link] = field(default_factory=dict)  # controllers, operators -> agent
    proxy_control: int = 0  # the delay proxy's control port (cut / heal)
    agent_metrics_ports: dict[str, int] = field(default_factory=dict)  # host key -> port
    prometheus_port: int = 0
    prometheus_sd_port: int = 0  # its discovery adapter (deploy/prometheus.py)

    @classmethod
    def make(cls, topology: Topology, ports: PortPlan) -> ClusterPlan:
        t = topology
        regions, hosts = t.region_names, t.hosts
        consul = ports.take()
        gateways = {r: ports.take() for r in regions}
        gateway_metrics = {r: ports.take() for r in regions}
        services = {h.key: ports.take() for h in hosts}
        service_metrics = {h.key: ports.take() for h in hosts}
        agents = {h.key: ports.take() for h in hosts}
        copies = {(s, h.key): h for s in t.shard_names for h in t.copies(s)}
        pg = {key: ports.take() for key in copies}
        service_links = {
            (r, h.key): Link(ports.take(), services[h.key], t.host_latency(Host(r), h))
            for r in regions for h in hosts if t.host_latency(Host(r), h) > 0
        }
        pg_links = {
            (h.key, s, c): Link(ports.take(), pg[(s, c)], t.host_latency(h, where))
            for h in hosts for (s, c), where in copies.items() if t.host_latency(h, where) > 0
        }
        plan = cls(t, consul, gateways, gateway_metrics, services, service_metrics, agents, pg,
                   service_links, pg_links)
        plan.controller_ports = {r: ports.take() for r in regions}
        plan.consul_links = {h.key: Link(ports.take(), consul, 0) for h in hosts}
        plan.check_links = {h.key: Link(ports.take(), services[h.key], 0) for h in hosts}
        plan.agent_links = {h.key: Link(ports.take(), agents[h.key], 0) for h in hosts}
        plan.proxy_control = ports.take()
        plan.agent_metrics_ports = {h.key: ports.take() for h in hosts}
        plan.prometheus_port = ports.take()
        plan.prometheus_sd_port = ports.take()
        return plan

    def all_links(self) -> list[tuple[Link, str, str]]:
        """Every proxied link with its two ends: a host key, `gateway:<region>`, `consul`
        (the Consul agent and its health checks) or `control` (failover controllers and
        operator tools calling node agents through the registry). Not proxied, so never
        cut: a gateway to its own region's first host (the same place), gateways and
        controllers to Consul."""
        links = [(link, f"gateway:{r}", h) for (r, h), link in self.service_links.items()]
        links += [(link, h, c) for (h, _, c), link in self.pg_links.items()]
        links += [(link, h, "consul") for h, link in self.consul_links.items()]
        links += [(link, "consul", h) for h, link in self.check_links.items()]
        links += [(link, "control", h) for h, link in self.agent_links.items()]
        return links

    def places(self, name: str) -> set[str]:
        """What `name` stands for in a cut: a region (its hosts and its gateway), a host
        (`region/zone`; `region/a` is the host keyed `region`), or `consul`, `control`,
        `gateway:<region>`."""
        t = self.topology
        if name in ("consul", "control") or name.startswith("gateway:"):
            return {name}
        if name in t.regions:
            return {h.key for h in t.hosts if h.region == name} | {f"gateway:{name}"}
        region, _, zone = name.partition("/")
        key = copy_key(region, zone or FIRST_ZONE)
        if key not in {h.key for h in t.hosts}:
            raise ValueError(f"{name!r} is neither a region nor a host of this cluster")
        return {key}

    def links_across(self, name: str, keep: tuple[str, ...] = ()) -> list[tuple[Link, str, str]]:
        """The links with one end in `name`'s places and the other outside them (and
        outside `keep`'s): what cutting it off cuts."""
        inside = self.places(name)
        kept = set().union(*(self.places(k) for k in keep)) if keep else set()
        return [(link, a, b) for link, a, b in self.all_links()
                if (a in inside) != (b in inside) and not ({a, b} - inside) <= kept]

    def gateway_url(self, region: str) -> str:
        return f"http://{LOCAL}:{self.gateway_ports[region]}"

    def service_url(self, host: str) -> str:
        """The booking service of a host (a region's first zone by the region's name)."""
        return f"http://{LOCAL}:{self.service_ports[host]}"

    def agent_url(self, host: str) -> str:
        return f"http://{LOCAL}:{self.agent_ports[host]}"

    def controller_url(self, region: str) -> str:
        """A failover controller's status and metrics listener (/status, /metrics)."""
        return f"http://{LOCAL}:{self.controller_ports[region]}"

    def metrics_urls(self) -> dict[str, str]:
        """Every process's /metrics URL, by process name."""
        urls = {f"gateway-{r}": f"http://{LOCAL}:{p}/metrics"
                for r, p in self.gateway_metrics_ports.items()}
        urls.update({f"shard_service-{h.replace('/', '-')}": f"http://{LOCAL}:{p}/metrics"
                     for h, p in self.service_metrics_ports.items()})
        return urls

    def rewrites_for(self, region: str) -> dict[str, str]:
        """The simulated network seen from a region's gateway: services elsewhere via
        delay proxies."""
        return {
            f"{LOCAL}:{self.service_ports[h]}": f"{LOCAL}:{link.listen_port}"
            for (r, h), link in self.service_links.items() if r == region
        }

    def pg_rewrites_for(self, host: str) -> dict[str, str]:
        """The simulated network seen from a host: databases elsewhere via delay proxies."""
        return {
            f"{LOCAL}:{self.pg_ports[(s, c)]}": f"{LOCAL}:{link.listen_port}"
            for (h, s, c), link in self.pg_links.items() if h == host
        }

    def map_regions(self) -> list[Region]:
        t = self.topology
        return [
            Region(name=r, gateway_url=self.gateway_url(r), location=t.regions[r],
                   latency_ms=t.latency_table(r))
            for r in t.region_names
        ]

    def map_shards(self) -> list[Shard]:
        t = self.topology
        return [
            Shard(
                name=s,
                epoch=1,
                primary_copy=copy_key(t.shards[s]),
                members={
                    h.key: ShardMember(region=h.region, zone=h.zone,
                                       service_url=f"{self.service_url(h.key)}/shards/{s}",
                                       db_address=f"{LOCAL}:{self.pg_ports[(s, h.key)]}")
                    for h in t.copies(s)
                },
                sync_standbys=tuple(t.sync_standbys(s)),
                sync_mode=t.sync_mode(s),
            )
            for s in t.shard_names
        ]


@dataclass
class Cluster:
    topology: Topology
    state_dir: Path
    base_port: int | None = None  # None: free ports from the OS (tests)
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    # Authenticates consistency tokens; every gateway of the cluster shares it.
    token_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # The delay proxy's control key (deploy/delay_proxy.py: the first line of a command).
    proxy_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # The master key of internal traffic (common/internal_auth.py): each kind of process
    # gets a key derived from it (`component_env`); it stays with the launcher.
    internal_key: str = field(default_factory=lambda: secrets.token_hex(32))
    # The metrics listeners' bearer token; Prometheus reads it from a file of its own.
    # (the environment's own when set: the test session gives every process it starts one)
    metrics_token: str = field(default_factory=lambda: os.environ.get(internal_auth.METRICS_TOKEN_ENV)
                               or secrets.token_urlsafe(32), repr=False)
    # The database roles' passwords (deploy/postgres.py): every server of the cluster.
    credentials: Credentials = field(default_factory=Credentials.generate)
    # Consul's initial management token (deploy/consul_agent.py): the launcher's and the
    # operator tools' (cluster.json); each kind of process gets its own token instead
    # (`consul_tokens`, made by deploy/consul_acl.py when Consul starts).
    consul_token: str = field(default_factory=new_token, repr=False)
    consul_tokens: dict[str, str] = field(default_factory=dict, repr=False)  # kind -> secret
    durable: bool | None = None
    map_prefix: str = "boxoffice/"
    progress: Progress = _quiet
    plan: ClusterPlan | None = None
    consul: ConsulAgent | None = None
    # (shard, copy key) -> the server's data directory and address; once the cluster is
    # up its process belongs to the host's node agent (see stop_copy / start_copy).
    databases: dict[tuple[str, str], PostgresServer] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)
    gateways: dict[str, ManagedProcess] = field(default_factory=dict)
    agents: dict[str, ManagedProcess] = field(default_factory=dict)  # host key -> agent
    controllers: dict[str, ManagedProcess] = field(default_factory=dict)  # region -> controller
    placements: dict[str, str] = field(default_factory=dict)
    started_at: float = 0.0
    prometheus: Prometheus | None = None  # when the topology enables it
    _restarting: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    # -- start -----------------------------------------------------------------
    def start(self) -> None:
        self.started_at = time.monotonic()
        t = self.topology
        self.plan = plan = ClusterPlan.make(t, PortPlan(self.base_port))
        self._reset_state_dir()
        durable = bool(t.postgres.get("durable", True)) if self.durable is None else self.durable
        n_replicas = sum(len(t.copies(s)) - 1 for s in t.shards)
        try:
            self._step("consul", lambda: self._start_consul(plan))
            self._step(f"{len(t.shards)} shard primaries", lambda: self._start_primaries(plan, durable))
            self._step("seed data placed across shards", lambda: asyncio.run(self._seed()))
            self._step("simulated network (delay proxies)", lambda: self._start_proxies(plan))
            self._step(f"{n_replicas} streaming replicas", lambda: self._start_replicas(plan, durable))
            self._step("synchronous standby sets", lambda: asyncio.run(self._set_sync_standbys()))
            self._step("region map loaded into consul", lambda: asyncio.run(self._load_map()))
            self._step(f"{len(t.hosts)} node agents (postgres in map roles, booking services)",
                       lambda: self._start_agents(plan, durable))
            self._step(f"{len(t.regions)} gateways", lambda: self._start_gateways(plan))
            self._step("services registered with consul health checks, all passing",
                       lambda: asyncio.run(self._register_services()))
            if t.controller.enabled:
                self._step(f"{len(t.regions)} failover controllers (one active)",
                           lambda: self._start_controllers(plan))
            self._step("metrics endpoints in consul" + (", prometheus" if t.prometheus.enabled else ""),
                       lambda: self._start_prometheus(plan))
            self._write_state()
        except BaseException:
            self.stop()
            raise

    def _reset_state_dir(self) -> None:
        """Start from an empty state directory; never wipe one this tool did not make, nor
        use one another user made or can write (`check_state_dir`)."""
        marker = self.state_dir / STATE_MARKER
        if self.state_dir.exists() or self.state_dir.is_symlink():
            check_state_dir(self.state_dir)
            if any(self.state_dir.iterdir()):
                if not marker.exists():
                    raise StateDirError(
                        f"{self.state_dir} is not empty and was not made by boxoffice; "
                        "choose another BOXOFFICE_STATE_DIR"
                    )
                for entry in self.state_dir.iterdir():  # the directory itself is kept: it is ours
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
        prepare_state_dir(self.state_dir)
        marker.write_text("state of a local boxoffice cluster; `boxoffice up` replaces it\n")
        # The node agents' own logs (they run as `postgres` when we are root).
        private_dir(self.state_dir / "logs", service_user())

    def _step(self, what: str, action: Callable[[], object]) -> None:
        started = time.monotonic()
        self.progress(f"  starting {what} ...")
        action()
        self.progress(f"  ok  {what} ({time.monotonic() - started:.1f}s)")

    def _start_consul(self, plan: ClusterPlan) -> None:
        self.consul = ConsulAgent(self.state_dir / "consul" / "data", plan.consul_http,
                                  management_token=self.consul_token)
        self.consul.start()
        made = bootstrap_consul_acl(self.consul.url, self.consul_token, self.map_prefix)
        self.consul_tokens = {kind: token.secret for kind, token in made.items()}

    def consul_store(self) -> ConsulMapStore:
        """A store on this cluster's Consul with the management token (the launcher's,
        tests' and operator tools' rights)."""
        assert self.consul is not None
        return ConsulMapStore(port=self.consul.http_port, prefix=self.map_prefix, token=self.consul_token)

    def _server(self, plan: ClusterPlan, shard: str, copy: str, durable: bool) -> PostgresServer:
        name = server_name(shard, copy)
        return PostgresServer(name, self.state_dir / "pg" / name, plan.pg_ports[(shard, copy)],
                              durable=durable, credentials=self.credentials,
                              log_dir=self.state_dir)  # the launcher's logs: in its own directory

    def _start_primaries(self, plan: ClusterPlan, durable: bool) -> None:
        for shard, home in self.topology.shards.items():
            server = self._server(plan, shard, copy_key(home), durable)
            server.init_primary()
            self.databases[(shard, copy_key(home))] = server

    async def _seed(self) -> None:
        primaries = {s: self.databases[(s, copy_key(h))] for s, h in self.topology.shards.items()}
        await asyncio.gather(*(schema.install(db.dsn, with_sample_data=True) for db in primaries.values()))
        await asyncio.gather(*(restrict_app_role(db.dsn) for db in primaries.values()))
        events = await schema.event_ids(next(iter(primaries.values())).dsn)
        shard_names = self.topology.shard_names
        self.placements = {e: shard_names[n % len(shard_names)] for n, e in enumerate(events)}
        for shard, db in primaries.items():
            await schema.keep_only_events(db.dsn, [e for e, s in self.placements.items() if s == shard])

    def _start_proxies(self, plan: ClusterPlan) -> None:
        links = [link for link, _, _ in plan.all_links()]
        proc = python_process(
            "delay-proxy", "deploy.delay_proxy",
            ["--control", str(plan.proxy_control), *(link.spec() for link in links)],
            self.state_dir / "delay-proxy.log",
            env={CONTROL_KEY_ENV: self.proxy_key},
        )
        proc.start()
        self.processes.append(proc)
        wait_until(lambda: all(port_open(LOCAL, link.listen_port) for link in links),
                   "delay proxies", alive=proc.running)

    def _start_replicas(self, plan: ClusterPlan, durable: bool) -> None:
        for shard, home in self.topology.shards.items():
            primary = self.databases[(shard, copy_key(home))]
            for host in self.topology.copies(shard)[1:]:
                replica = self._server(plan, shard, host.key, durable)
                link = plan.pg_links.get((host.key, shard, copy_key(home)))
                replica.init_replica(primary, via_port=link.listen_port if link else None)
                self.databases[(shard, host.key)] = replica

    async def _set_sync_standbys(self) -> None:
        """Each primary's synchronous standby set, as the topology's `sync` asks (after
        the base backups, so no replica inherits it)."""
        for shard, home in self.topology.shards.items():
            mode = self.topology.sync_mode(shard)
            names = [server_name(shard, c) for c in self.topology.sync_standbys(shard)]
            await self.databases[(shard, copy_key(home))].set_sync_standbys(names, mode)  # type: ignore[arg-type]

    async def _load_map(self) -> None:
        assert self.plan is not None and self.consul is not None
        store = self.consul_store()
        try:
            for region in self.plan.map_regions():
                await store.put_region(region, 0)
            for shard in self.plan.map_shards():
                await store.put_shard(shard, 0)
            for event_id, shard_name in self.placements.items():
                await store.place_event(event_id, shard_name, 0)
        finally:
            await store.close()

    # -- what each kind of process is given ------------------------------------------
    def component_env(self, kind: str) -> dict[str, str]:
        """The secrets one kind of process gets in its environment ("agent", "service",
        "gateway", "controller"): each kind only what it needs."""
        # The operator token only where it is used as such (a gateway's sign-in and operator
        # API); agents, services and controllers verify the operator by its derived key and
        # sign with their own (common/internal_auth.py); an inherited token is blanked.
        env = {ADMIN_TOKEN_ENV: self.admin_token if kind == "gateway" else ""}
        if kind == "gateway":
            env[TOKEN_SECRET_ENV] = self.token_secret
        # Its own signing key, the verification keys of its callers (common/internal_auth.py).
        env.update(internal_auth.process_env(kind, bytes.fromhex(self.internal_key), self.admin_token))
        env[internal_auth.METRICS_TOKEN_ENV] = self.metrics_token  # its metrics listener's
        # Its Consul ACL token (deploy/consul_acl.py); an inherited CONSUL_HTTP_TOKEN,
        # which the mains would prefer, is blanked.
        if kind in self.consul_tokens:
            env.update({CONSUL_TOKEN_ENV: self.consul_tokens[kind], "CONSUL_HTTP_TOKEN": ""})
        if kind == "service":  # its database password: the passfile (Cluster._write_passfile)
            env["PGPASSFILE"] = str(self.state_dir / PASSFILE)
        return env

    # -- node agents -----------------------------------------------------------------
    def agent_config(self, plan: ClusterPlan, host: Host, durable: bool) -> dict[str, Any]:
        """The node agent's configuration for one host (node_agent/config.py)."""
        t = self.topology
        here = [s for s in t.shard_names if host in t.copies(s)]
        specs = [
            ShardSpec(name=s, dsn=self.databases[(s, host.key)].app_dsn, member=host.key,
                      pool_size=20 if host == t.copies(s)[0] else 10)
            for s in here
        ]
        argv = ["--region", host.region, "--port", str(plan.service_ports[host.key]),
                "--metrics-port", str(plan.service_metrics_ports[host.key]),
                "--consul", f"{LOCAL}:{plan.consul_links[host.key].listen_port}",
                "--map-prefix", self.map_prefix]
        for spec in specs:
            argv += ["--shard", spec.argument()]
        interpreter, interpreter_env = python_command(python_user(service_user()))
        return {
            "region": host.region,
            "zone": host.zone,
            "consul": {"host": LOCAL, "port": plan.consul_links[host.key].listen_port,
                       "prefix": self.map_prefix},
            "log_dir": str(self.state_dir / "logs"),
            "durable": durable,
            "copies": [
                {"shard": s, "name": self.databases[(s, host.key)].name,
                 "data_dir": str(self.databases[(s, host.key)].data_dir),
                 "port": plan.pg_ports[(s, host.key)], "host": LOCAL, "member": host.key}
                for s in here
            ],
            # Run by the agent, as the agent's user (`postgres` when we are root).
            "service": {"argv": [*interpreter, "-m", "shard_service", *argv],
                        "env": {**interpreter_env, **self.component_env("service")}},
            "rewrites": plan.pg_rewrites_for(host.key),
            "postgres": self.credentials.to_json(),
        }

    def _start_agents(self, plan: ClusterPlan, durable: bool) -> None:
        # The launcher made the servers; from here on each host's agent owns them.
        for db in self.databases.values():
            db.stop()
        self._write_passfile()
        procs: dict[str, ManagedProcess] = {}
        for host in self.topology.hosts:
            config = self.state_dir / f"node-agent-{host.slug}.json"
            # Read by the agent (group postgres when we are root), written by root only.
            agent_user = service_user()
            write_private(config, json.dumps(self.agent_config(plan, host, durable), indent=2),
                          mode=0o640 if agent_user else 0o600, group=agent_user)
            proc = python_process(
                f"node-agent[{host.key}]", "node_agent",
                ["--region", host.region, "--port", str(plan.agent_ports[host.key]),
                 "--metrics-port", str(plan.agent_metrics_ports[host.key]), "--config", str(config)],
                self.state_dir / f"node-agent-{host.slug}.log",
                env=self.component_env("agent"), user=service_user(),
            )
            proc.start()
            procs[host.key] = proc
            self.processes.append(proc)
        self.agents.update(procs)
        for host in self.topology.hosts:
            wait_healthy(plan.service_url(host.key), procs[host.key],
                         f"booking service {host.key} (started by its node agent)", timeout=60)

    def _write_passfile(self) -> None:
        """The booking services' passfile: their role's password, 0600 to the user they
        run as (the agents' user; libpq and asyncpg refuse a passfile others may read)."""
        write_private(self.state_dir / PASSFILE, self.credentials.passfile((APP_ROLE,)),
                      owner=service_user())

    # -- gateways ------------------------------------------------------------------------
    def gateway_args(self, plan: ClusterPlan, region: str) -> list[str]:
        """`python -m gateway` arguments for one region's gateway (the topology's settings)."""
        topology_file = self.state_dir / "topology.json"
        if not topology_file.exists():
            topology_file.write_text(json.dumps({
                "client_regions": [
                    {"prefix": str(rule.network), "region": rule.region}
                    for rule in self.topology.client_regions
                ]
            }))
        args = [
            "--region", region,
            "--port", str(plan.gateway_ports[region]),
            "--consul", f"{LOCAL}:{plan.consul_http}",
            "--map-prefix", self.map_prefix,
            "--client-regions", str(topology_file),
            "--rewrites", json.dumps(plan.rewrites_for(region)),
            "--metrics-port", str(plan.gateway_metrics_ports[region]),
        ]
        for key, value in self.topology.gateway.items():
            args += [GATEWAY_SETTINGS[key], str(value)]
        return args

    def _start_gateways(self, plan: ClusterPlan) -> None:
        procs = {}
        for region in self.topology.region_names:
            proc = python_process(
                f"gateway[{region}]", "gateway", self.gateway_args(plan, region),
                self.state_dir / f"gateway-{region}.log",
                env=self.component_env("gateway"),
            )
            proc.start()
            procs[region] = proc
            self.processes.append(proc)
        for region, proc in procs.items():
            wait_healthy(plan.gateway_url(region), proc, f"gateway {region}")
            self.gateways[region] = proc
        asyncio.run(self._wait_gateways_ready(lambda status, _: status == 200,
                                              "has not loaded the region map"))

    # -- failover controllers ---------------------------------------------------------------
    def controller_args(self, plan: ClusterPlan, region: str) -> list[str]:
        """`python -m failover` arguments for one region's controller (the topology's settings)."""
        settings = self.topology.controller
        return ["--region", region, "--consul", f"{LOCAL}:{plan.consul_http}",
                "--map-prefix", self.map_prefix, "--port", str(plan.controller_ports[region]),
                "--grace-ms", str(settings.grace_ms), "--lock-ttl", str(settings.lock_ttl_seconds)]

    def _start_controllers(self, plan: ClusterPlan) -> None:
        """One controller per region, started after every check passes (so none starts out
        looking at a critical check), then until one of them holds the lock."""
        for region in self.topology.region_names:
            proc = python_process(f"controller[{region}]", "failover", self.controller_args(plan, region),
                                  self.state_dir / f"controller-{region}.log",
                                  env=self.component_env("controller"))
            proc.start()
            self.controllers[region] = proc
            self.processes.append(proc)

        def one_active() -> bool:
            docs = [self.controller_status(r) for r in self.controllers]
            return all(docs) and sum(bool(d.get("active")) for d in docs) == 1

        wait_until(one_active, "every failover controller answering, one holding the lock", 30.0,
                   alive=lambda: all(p.running() for p in self.controllers.values()))

    def controller_status(self, region: str) -> dict[str, Any]:
        """A controller's GET /status, signed as the operator ({} when it does not answer)."""
        import urllib.request

        assert self.plan is not None
        url = f"{self.plan.controller_url(region)}/status"
        signature = internal_auth.Signer.operator(self.admin_token).sign("GET", url)
        request = urllib.request.Request(url, headers=signature)
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                return dict(json.loads(resp.read()))
        except (OSError, ValueError):
            return {}

    async def _register_metrics(self, plan: ClusterPlan) -> None:
        assert self.consul is not None
        async with self.consul_store() as store:
            await prometheus.register_endpoints(store, prometheus.endpoints(plan, self.controllers))

    def _start_prometheus(self, plan: ClusterPlan) -> None:
        """Every metrics listener registered in Consul; Prometheus, if enabled, finds them there."""
        assert self.consul is not None
        asyncio.run(self._register_metrics(plan))
        if self.topology.prometheus.enabled:
            self.prometheus = prometheus.Prometheus(self.state_dir / "prometheus", plan.prometheus_port,
                                                    plan.prometheus_sd_port, self.consul.http_port,
                                                    self.consul_tokens["prometheus"],
                                                    scrape_token=self.metrics_token)
            try:
                self.prometheus.start()
            finally:
                self.processes += [p for p in (self.prometheus.adapter, self.prometheus.process) if p]

    # -- registry ------------------------------------------------------------------------
    def copy_instance_id(self, shard: str, copy: str) -> str:
        """The registry id of the booking service's instance for one shard copy."""
        return f"{BOOKING_SERVICE}-{copy.replace('/', '-')}-{shard}"

    async def _register_services(self) -> None:
        """Every gateway, node agent, and shard copy's booking service (one instance per
        copy, checked on the copy's /api/ready: its database answers in the role the
        map gives it), with an HTTP health check in Consul; then wait until every check
        passes (a new check starts critical) and every gateway's health view says so,
        so that no copy starts out demoted."""
        assert self.plan is not None and self.consul is not None
        plan = self.plan
        store = self.consul_store()
        wanted: dict[str, set[str]] = {BOOKING_SERVICE: set(), GATEWAY_SERVICE: set(),
                                       NODE_AGENT_SERVICE: set()}
        try:
            for shard in plan.map_shards():
                for key, member in shard.members.items():
                    instance = self.copy_instance_id(shard.name, key)
                    # Consul checks the copy from where Consul is (its link to the host).
                    check = f"http://{LOCAL}:{plan.check_links[key].listen_port}/shards/{shard.name}"
                    await store.register_service(
                        BOOKING_SERVICE, instance, LOCAL, plan.service_ports[key],
                        [f"region={member.region}", f"zone={member.zone}", f"shard={shard.name}"],
                        f"{check}/api/ready", url=member.service_url,
                    )
                    wanted[BOOKING_SERVICE].add(instance)
            for host in self.topology.hosts:
                instance = f"{NODE_AGENT_SERVICE}-{host.slug}"
                # Controllers and operator tools reach the agent through its link.
                url = f"http://{LOCAL}:{plan.agent_links[host.key].listen_port}"
                await store.register_service(
                    NODE_AGENT_SERVICE, instance, LOCAL, plan.agent_ports[host.key],
                    [f"region={host.region}", f"zone={host.zone}", f"host={host.key}"],
                    f"{url}/agent/health", url=url,
                )
                wanted[NODE_AGENT_SERVICE].add(instance)
            for region in self.topology.region_names:
                port = plan.gateway_ports[region]
                await store.register_service(
                    GATEWAY_SERVICE, f"{GATEWAY_SERVICE}-{region}", LOCAL, port,
                    [f"region={region}"], f"http://{LOCAL}:{port}/api/health",
                    url=plan.gateway_url(region),
                )
                wanted[GATEWAY_SERVICE].add(f"{GATEWAY_SERVICE}-{region}")
        finally:
            await store.close()
        await self._wait_passing(wanted)

    async def _wait_passing(self, wanted: dict[str, set[str]], timeout: float = 60.0) -> None:
        """Until the instances pass their checks in Consul and no gateway sees a failing one."""
        store = self.consul_store()
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
                                        "still sees a failing service", timeout)

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
        plan = self.plan
        state = {
            "pid": os.getpid(),
            "consul": self.consul.address,
            "mapPrefix": self.map_prefix,
            "adminToken": self.admin_token,
            "consulToken": self.consul_token,  # Consul's management token (operator tools)
            "gateways": {r: plan.gateway_url(r) for r in self.topology.region_names},
            "agents": {h.key: plan.agent_url(h.key) for h in self.topology.hosts},
            "controllers": {r: plan.controller_url(r) for r in self.controllers},
            "delayProxyControl": plan.proxy_control,
            "delayProxyKey": self.proxy_key,
            "metrics": {e.process: e.url for e in prometheus.endpoints(plan, self.controllers)},
            "prometheus": self.prometheus.url if self.prometheus else None,
            # Operator tools (the load test's invariant check) read the databases directly.
            "primaries": {
                shard: self.databases[(shard, copy_key(home))].dsn
                for shard, home in self.topology.shards.items()
            },
            "copies": {f"{s}@{c}": db.dsn for (s, c), db in self.databases.items()},
        }
        write_private(self.state_dir / "cluster.json", json.dumps(state, indent=2))

    # -- faults (tests and drills), through the node agents' operator API ------------------
    def agent_call(self, host: str, method: str, path: str, body: Any = None,
                   timeout: float = 60.0) -> Any:
        """One call to a host's node agent (signed as the operator); its JSON answer."""
        import urllib.request

        assert self.plan is not None
        data = json.dumps(body).encode() if body is not None else None
        url = f"{self.plan.agent_url(host)}{path}"
        signature = internal_auth.Signer.operator(self.admin_token).sign(method, url, data or b"")
        req = urllib.request.Request(
            url, data=data, method=method,
            headers={**signature,
                     **({"Content-Type": "application/json"} if data is not None else {})},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")

    def stop_copy(self, shard: str, copy: str) -> None:
        """Stop one copy's Postgres; its agent leaves it down until `start_copy`."""
        self.agent_call(copy, "POST", f"/agent/copies/{shard}/stop")

    def start_copy(self, shard: str, copy: str) -> None:
        self.agent_call(copy, "POST", f"/agent/copies/{shard}/start")

    def service_pid(self, host: str) -> int | None:
        service = self.agent_call(host, "GET", "/agent/copies").get("service") or {}
        pid = service.get("pid")
        return int(pid) if pid else None

    def signal_service(self, host: str, sig: int) -> None:
        """Send a signal to a host's booking service (SIGSTOP: it hangs, as a host would)."""
        pid = self.service_pid(host)
        if pid is not None:
            os.kill(pid, sig)

    def stop_service(self, host: str) -> None:
        """Stop one host's booking service (every shard copy it serves goes dark); its
        agent leaves it down until `start_service`."""
        self.agent_call(host, "POST", "/agent/service/stop")

    def start_service(self, host: str, timeout: float = 30.0) -> None:
        """Start a stopped booking service again and wait until it answers and passes
        its health check in every gateway's view."""
        assert self.plan is not None
        self.agent_call(host, "POST", "/agent/service/start")
        wait_healthy(self.plan.service_url(host), self.agents[host], f"booking service {host}", timeout)
        copies = {self.copy_instance_id(s, host) for s in self.topology.shard_names
                  if host in {h.key for h in self.topology.copies(s)}}
        asyncio.run(self._wait_passing({BOOKING_SERVICE: copies}, timeout))

    def cut(self, name: str, *, keep: tuple[str, ...] = ()) -> list[str]:
        """Cut a region or a host off (see `ClusterPlan.places`): every proxied link
        between it and anything else, except to `keep`'s places, black-holes (open
        connections and new ones hear nothing; deploy/delay_proxy.py). A host's own
        processes still reach each other. Cutting a host cuts it from Consul (its agent
        and booking service read the map through their link), from Consul's checks of
        it, from the controllers' probes, from the other hosts' databases and from other
        regions' gateways; its own region's gateway reaches its first host directly.
        Returns the cut links, described."""
        from deploy.delay_proxy import control

        assert self.plan is not None
        links = self.plan.links_across(name, keep)
        control(self.plan.proxy_control, "cut " + " ".join(str(link.listen_port) for link, _, _ in links),
                self.proxy_key)
        return [f"{a} -> {b}" for _, a, b in links]

    def heal(self, name: str | None = None) -> None:
        """Heal what `cut(name)` cut (None: every link); black-holed connections are reset."""
        from deploy.delay_proxy import control

        assert self.plan is not None
        if name is None:
            control(self.plan.proxy_control, "heal all", self.proxy_key)
            return
        ports = [str(link.listen_port) for link, _, _ in self.plan.links_across(name)]
        control(self.plan.proxy_control, "heal " + " ".join(ports), self.proxy_key)

    def held_down(self) -> dict[str, str]:
        """The node agents a drill holds down now (failover/holddown.py): process name ->
        who holds it (`drill, pid N`). Stale markers (their holder gone) are dropped."""
        return {self.agents[host].name: f"{doc.get('why', 'drill')}, pid {doc.get('holder')}"
                for host, doc in holddown.held(self.state_dir).items() if host in self.agents}

    def restart_dead(self) -> list[str]:
        """Start again any process of the launcher's own that exited (gateways, node
        agents, the delay proxy); their names. The agents restart what they own. The
        node agent of a host a drill holds down stays down until the drill releases it
        (failover/holddown.py); one caller at a time (the `up` loop and a drill's
        restore may both call it)."""
        with self._restarting:
            held = self.held_down()
            restarted = []
            for proc in self.processes:
                if proc.name not in held and not proc.running():
                    proc.start()
                    restarted.append(proc.name)
            return restarted

    # -- stop ------------------------------------------------------------------
    def stop(self) -> None:
        """Stop everything this cluster started, newest first. Safe to call twice."""
        for proc in reversed(self.processes):
            proc.stop(timeout=40.0)  # an agent stops its servers and service first
        self.processes.clear()
        for db in self.databases.values():
            db.stop()
            db.stop_stray_postmaster()
        if self.consul is not None:
            self.consul.stop()

    def pids(self) -> list[int]:
        pids = [p.pid for p in self.processes if p.pid]
        pids += [db.process.pid for db in self.databases.values() if db.process and db.process.pid]
        if self.consul and self.consul.process and self.consul.process.pid:
            pids.append(self.consul.process.pid)
        return pids

