"""A real Consul agent: a single-node server with its data on disk.

Not `-dev`: a dev agent keeps KV in memory, and a test that stops Consul and
starts it again must find the region map still there, as it would be on a
real server cluster.

ACLs are on, `default_policy = "deny"`: a call without a token (the anonymous token has
no rights) or with a token whose policy does not allow it is refused (403). The initial
management token (`management_token`, generated unless given) lives only in the agent's
0600 config file (never on its command line, which every local user can read) and with
whoever started it; deploy/consul_acl.py makes each component's token from it. The agent
uses it as its own agent token (registering its node, anti-entropy): the agent process
holds it anyway. `enable_key_list_policy`: a recursive read needs the `list` right, so a
token that may not read the map is refused (403) instead of being shown an empty map.

`down_policy = "extend-cache"`: when the servers cannot resolve a token, a token already
resolved keeps the rights it had and an unknown one is denied. `deny` would turn a
Consul hiccup into every controller losing its lock and every reader its map at once,
`allow` would open Consul to anyone while it lasts; neither must follow from an outage
(a Consul outage never demotes or promotes by itself).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from deploy.procs import ManagedProcess, free_port, wait_until

SESSION_TTL_MIN = "1s"  # the shortest session TTL the agent accepts
DOWN_POLICY = "extend-cache"  # see the module's docstring


def new_token() -> str:
    """A fresh ACL secret: Consul wants a UUID; uuid4 is drawn from os.urandom."""
    return str(uuid.uuid4())


def write_secret(path: Path, text: str) -> None:
    """Write a file readable by its owner only, from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode under O_CREAT
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def consul_binary() -> str:
    """A `consul` on PATH wins; else the one scripts/install.sh put beside our Python."""
    env = os.environ.get("BOXOFFICE_CONSUL_BIN")
    if env:
        return env
    found = shutil.which("consul") or shutil.which("consul", path=str(Path(sys.prefix) / "bin"))
    if not found:
        raise FileNotFoundError("consul not found: run scripts/install.sh")
    return found


@dataclass
class ConsulAgent:
    data_dir: Path
    http_port: int
    serf_lan_port: int = 0
    serf_wan_port: int = 0
    server_port: int = 0
    process: ManagedProcess | None = None
    management_token: str = field(default_factory=new_token, repr=False)

    def __post_init__(self) -> None:
        self.serf_lan_port = self.serf_lan_port or free_port()
        self.serf_wan_port = self.serf_wan_port or free_port()
        self.server_port = self.server_port or free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def config_file(self) -> Path:
        """The ACL part of the configuration (it holds the management token: 0600)."""
        return self.data_dir.parent / "consul-acl.json"

    def acl_config(self) -> dict[str, object]:
        return {"acl": {
            "enabled": True, "default_policy": "deny", "down_policy": DOWN_POLICY,
            "enable_key_list_policy": True,
            "tokens": {"master": self.management_token, "agent": self.management_token},
        }}

    def command_line(self) -> list[str]:
        return [
            consul_binary(), "agent",
            "-server", "-bootstrap-expect=1",
            "-node=boxoffice-consul",
            f"-data-dir={self.data_dir}",
            "-bind=127.0.0.1", "-client=127.0.0.1", "-advertise=127.0.0.1",
            f"-http-port={self.http_port}",
            "-dns-port=-1", "-grpc-port=-1",
            f"-serf-lan-port={self.serf_lan_port}",
            f"-serf-wan-port={self.serf_wan_port}",
            f"-server-port={self.server_port}",
            "-hcl", "performance { raft_multiplier = 1 }",
            "-hcl", "disable_update_check = true",
            # Session TTLs down to 1 s (Consul's default floor is 10 s): the failover
            # controller's leader lock expires about 2 x TTL after its holder dies.
            "-hcl", f'session_ttl_min = "{SESSION_TTL_MIN}"',
            f"-config-file={self.config_file}",
            "-log-level=warn",
        ]

    def start(self, timeout: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        write_secret(self.config_file, json.dumps(self.acl_config(), indent=2))
        self.process = ManagedProcess(
            "consul",
            self.command_line(),
            self.data_dir.parent / "consul.log",
            stop_signal=signal.SIGTERM,
        )
        self.process.start()
        wait_until(self.has_leader, f"consul on {self.address}", timeout, alive=self.process.running)

    def has_leader(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v1/status/leader", timeout=0.5) as resp:
                leader = json.loads(resp.read() or b'""')
                if not leader:
                    return False
            # The KV store answers only once the leader has applied its first entries, and
            # the management token works only once the leader has made it (403 before).
            req = urllib.request.Request(f"{self.url}/v1/kv/?keys",
                                         headers={"X-Consul-Token": self.management_token})
            with urllib.request.urlopen(req, timeout=0.5) as resp:
                return resp.status in (200, 404)
        except OSError as exc:
            return getattr(exc, "code", None) == 404

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def running(self) -> bool:
        return self.process is not None and self.process.running()
