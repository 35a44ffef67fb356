"""What a failover drill reaches and how it acts on it: `DrillCluster`.

A drill reaches the gateways (its booking load, its events), Consul (the map, the
checks, the controllers' lock), the node agents (through the registry) and, through
two small interfaces, the faults it causes (`Faults`) and the audit it makes
(`Auditor`). Three ways to build one:

- `DrillCluster.from_cluster`: a cluster this process started (tests, loadtest.failover).
  Faults are signals to its processes; the audit reads the databases.
- `DrillCluster.from_state`: the cluster `boxoffice up` runs (its cluster.json), for
  `boxoffice drill failover`. Faults are signals found through /proc.
- gateway/drills_api.py: faults through the node agents' drill primitives, the audit
  through the booking services (a gateway sends no signals and has no database).

Rules:
- A host killed by signal is held down first (failover/holddown.py): the supervisor of
  the cluster's processes (`boxoffice up`'s restart loop, `Cluster.restart_dead`) does
  not start it again until `restart` releases it. The marker is written before the
  signal is sent, and released on every way out of the drill.
- `restart` brings back everything the drill took down, and only that; it is
  idempotent.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from failover import holddown

if TYPE_CHECKING:
    from deploy.cluster import Cluster


class DrillError(Exception):
    """The drill could not run (or could not finish): the cluster was not at full
    strength, a kind is unavailable, recovery did not come, or will not come."""


class Faults(Protocol):
    """How a drill acts on the cluster's processes."""

    def kill_host(self, host: str) -> None:
        """The host dies (its Postgres servers and booking service with it) and stays
        down until `restart`."""

    def restart(self) -> list[str]:
        """Bring back what the drill took down (names, with how)."""

    def pause_controllers(self, paused: bool) -> list[str]:
        """SIGSTOP (True) or SIGCONT (False) every failover controller; their names."""


@dataclass
class ShardAudit:
    """One shard primary's database after the drill, for the run's bookings."""

    bookings: dict[str, str]  # id -> status, of the run's references
    oversold: list[dict[str, Any]]  # tiers with sold + remaining != capacity or remaining < 0
    duplicated: list[dict[str, Any]]  # references on more than one booking


class Auditor(Protocol):
    async def audit(self, shard: str, copy: str, event_id: str, prefix: str) -> ShardAudit: ...


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
    """Faults by signals to the local cluster's processes, given how to find them.
    A killed host is held down in `state_dir` (failover/holddown.py) until `restart`;
    `relaunch`, when given, then starts the released agents itself (a cluster this
    process runs); otherwise the supervisor that honours the markers does."""

    def __init__(self, agent_pid: Callable[[str], int | None],
                 controller_pids: Callable[[], dict[str, int]], state_dir: Path,
                 relaunch: Callable[[], list[str]] | None = None) -> None:
        self.agent_pid = agent_pid
        self.controller_pids = controller_pids
        self.state_dir = state_dir
        self.relaunch = relaunch
        self.held: list[str] = []

    def kill_host(self, host: str) -> None:
        pid = self.agent_pid(host)
        if pid is None:
            raise DrillError(f"no node agent process found for host {host}")
        holddown.hold(self.state_dir, host)  # before the signal: never dead and unheld
        self.held.append(host)
        os.kill(pid, signal.SIGKILL)

    def restart(self) -> list[str]:
        released, self.held = self.held, []
        for host in released:
            holddown.release(self.state_dir, host)
        if self.relaunch is not None:
            return self.relaunch()
        return [f"node-agent[{h}] (released to its supervisor)" for h in released]

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
    # The Consul ACL token the drill reads the map and writes its report with: the
    # launcher's management token (cluster.json); None: the process's own
    # ($BOXOFFICE_CONSUL_TOKEN, e.g. a gateway's, which may write drill reports).
    consul_token: str | None = None

    @classmethod
    def from_cluster(cls, cluster: Cluster) -> DrillCluster:
        """A cluster this process started (tests, loadtest.failover): the drill holds a
        killed host down and starts it again itself (`Cluster.restart_dead`, which
        honours the hold)."""
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
            faults=ProcessFaults(agent_pid, controller_pids, cluster.state_dir, cluster.restart_dead),
            auditor=DatabaseAuditor({k: db.dsn for k, db in cluster.databases.items()}),
            consul_token=cluster.consul_token,
        )

    @classmethod
    def from_state(cls, state_dir: Path, state: dict[str, Any]) -> DrillCluster:
        """The cluster `boxoffice up` runs (its cluster.json): a killed host is held
        down in its state directory; released, `up`'s loop starts it within a second."""
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
            faults=ProcessFaults(agent_pid, controller_pids, state_dir),
            auditor=DatabaseAuditor(dsns),
            consul_token=state.get("consulToken"),
        )
