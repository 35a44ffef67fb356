"""Where a local cluster's processes are: read from its state directory and /proc.

A drill acts on processes by signals, so it must find them, whoever started the
cluster (`boxoffice up`, or a test's `Cluster` in-process). Everything here comes from
what the launcher wrote into the state directory and what the kernel shows:

- `cluster.json`: Consul's address, the gateways, controllers, node agents, every
  copy's DSN and the delay proxy's control port;
- `node-agent-<host>.json`: each host's copies (data directory, port), its booking
  service's command line (its port), its link to Consul and its links to the other
  hosts' databases (the `rewrites`);
- /proc: a node agent is the process whose argv names its config file; a booking
  service names its port; a controller its status port; Consul its HTTP port; a
  postmaster is the first line of its data directory's `postmaster.pid`, and a copy's
  WAL receiver the postmaster's child whose title says `walreceiver`.

A host's links are the delay proxy's links (its `status` command) with an end on the
host: those whose target is one of its ports (service, databases, agent), and those
it dials out through (its Consul link, its rewrites). Cutting them all cuts the host
off as `Cluster.cut(host)` does. Nothing here is cached across calls: a restarted
process has a new pid.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class PlaceError(Exception):
    """The state directory does not describe a running cluster."""


@dataclass(frozen=True)
class HostPlace:
    key: str  # the host key (`us-east`, `us-east/b`)
    config: Path  # its node agent's config file
    agent_port: int
    service_port: int
    copies: dict[str, tuple[Path, int]]  # shard -> (data directory, port)
    outbound: tuple[int, ...]  # proxy listen ports it dials: Consul, other hosts' databases


@dataclass
class Places:
    state_dir: Path
    state: dict[str, Any]
    hosts: dict[str, HostPlace] = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path) -> Places:
        try:
            state = json.loads((state_dir / "cluster.json").read_text())
        except (OSError, ValueError) as exc:
            raise PlaceError(f"no running cluster in {state_dir} ({exc})") from None
        places = cls(state_dir, state)
        for host, url in (state.get("agents") or {}).items():
            config = state_dir / f"node-agent-{host.replace('/', '-')}.json"
            doc = json.loads(config.read_text())
            argv = doc["service"]["argv"]
            outbound = [int(doc["consul"]["port"])]
            outbound += [int(v.rsplit(":", 1)[1]) for v in (doc.get("rewrites") or {}).values()]
            places.hosts[host] = HostPlace(
                host, config, int(str(url).rsplit(":", 1)[1]), int(argv[argv.index("--port") + 1]),
                {c["shard"]: (Path(c["data_dir"]), int(c["port"])) for c in doc["copies"]},
                tuple(outbound))
        return places

    @property
    def consul_token(self) -> str | None:
        """Consul's management token (`up` keeps it in cluster.json, 0600)."""
        token = self.state.get("consulToken")
        return str(token) if token else None

    @property
    def consul_port(self) -> int:
        return int(str(self.state["consul"]).rsplit(":", 1)[1])

    def dsns(self) -> dict[tuple[str, str], str]:
        """(shard, copy) -> DSN of every copy (operator tooling reads them directly)."""
        found = {}
        for key, dsn in (self.state.get("copies") or {}).items():
            shard, _, copy = key.partition("@")
            found[(shard, copy)] = str(dsn)
        return found

    # -- processes ---------------------------------------------------------------------
    def agent_pid(self, host: str) -> int | None:
        config = str(self.hosts[host].config)
        return _first(pids_by_argv(lambda a: "node_agent" in a and config in a))

    def service_pid(self, host: str) -> int | None:
        port = str(self.hosts[host].service_port)
        return _first(pids_by_argv(lambda a: "shard_service" in a and _flag(a, "--port") == port))

    def controller_pids(self) -> dict[str, int]:
        found = {}
        for region, url in (self.state.get("controllers") or {}).items():
            port = str(url).rsplit(":", 1)[1]
            pid = _first(pids_by_argv(lambda a, port=port: "failover" in a and _flag(a, "--port") == port))
            if pid is not None:
                found[region] = pid
        return found

    def consul_pid(self) -> int | None:
        wanted = f"-http-port={self.consul_port}"
        return _first(pids_by_argv(lambda a: "agent" in a and wanted in a))

    def postmaster_pid(self, shard: str, host: str) -> int | None:
        data_dir, _ = self.hosts[host].copies[shard]
        try:
            pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def walreceiver_pid(self, shard: str, host: str) -> int | None:
        postmaster = self.postmaster_pid(shard, host)
        if postmaster is None:
            return None
        for pid in children(postmaster):
            if "walreceiver" in _cmdline(pid):
                return pid
        return None

    # -- links ---------------------------------------------------------------------------
    def host_links(self, host: str) -> list[int]:
        """The delay proxy's listen ports with an end on `host` (module docstring)."""
        place = self.hosts[host]
        targets = {place.service_port, place.agent_port, *(port for _, port in place.copies.values())}
        links = self.proxy("status")["links"]
        assert isinstance(links, dict)
        ports = {int(listen) for listen, spec in links.items() if int(str(spec).split(":")[1]) in targets}
        return sorted(ports | (set(place.outbound) & {int(p) for p in links}))

    def proxy(self, line: str, timeout: float = 5.0) -> dict[str, object]:
        """One command to the delay proxy's control port (deploy/delay_proxy.py: `cut
        PORT ...`, `heal PORT ...|all`, `status`); its JSON answer."""
        port = int(self.state["delayProxyControl"])
        key = self.state.get("delayProxyKey")  # the first line: the cluster's control key
        first = f"key {key}\n" if key else ""  # (none: a cluster started before keys)
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"{first}{line}\n".encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        answer = json.loads(data)
        if not isinstance(answer, dict) or "error" in answer:
            raise PlaceError(f"delay proxy: {answer}")
        return answer


def pids_by_argv(match: Any) -> list[int]:
    """The processes whose argv (a list of str) satisfies `match`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if match(argv) and alive(int(entry.name)):
                found.append(int(entry.name))
    return sorted(found)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running or stopped, not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def _first(pids: list[int]) -> int | None:
    return pids[0] if pids else None


def signal_pid(pid: int, sig: int) -> bool:
    """Send a signal; False when the process is gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True
