"""The agent's configuration: which copies (Postgres servers) and which booking-service
process it owns. JSON or YAML; the launcher generates it from the topology.

Example (YAML):

    region: east
    consul: {host: 127.0.0.1, port: 8500, prefix: boxoffice/}
    log_dir: /var/lib/boxoffice/east/logs
    durable: true
    copies:
      - {shard: shard-1, name: shard-1-east, data_dir: /var/lib/boxoffice/pg/shard-1-east, port: 5433}
    service:
      argv: [python, -m, shard_service, --region, east, --port, "8101", ...]

One agent per host: `zone` (default the region's first, "a") says which. A copy's
`member` is the key of its copy in the map's shard record (`Shard.members`); it
defaults to the host's copy key (`region_map.copy_key(region, zone)`: the region for a
first zone, `region/zone` otherwise). `rewrites` maps a database address as the map
gives it ("host:port") to the address this host must dial for it (the local cluster's
simulated network sends other hosts' traffic through delay proxies); addresses not
listed are dialled as they are.

`postgres` holds the passwords of the cluster's database roles (deploy/postgres.py
`Credentials`: the superuser for the agent's own work, the replication role for its
standbys); the file is the agent's secret (0640 root:postgres when a root launcher wrote
it, in a directory only root can write). The booking service's password reaches it in
the passfile its `service.env` names (PGPASSFILE), not in its argv.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy.postgres import Credentials
from region_map import FIRST_ZONE, copy_key


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class CopyConfig:
    shard: str
    name: str  # the server's name: cluster_name and application_name (synchronous set)
    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    member: str = ""  # the shard record's member key; "" = the agent's region

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServiceConfig:
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ConsulConfig:
    host: str = "127.0.0.1"
    port: int = 8500
    prefix: str = "boxoffice/"
    token: str | None = None


@dataclass(frozen=True)
class AgentConfig:
    region: str
    copies: tuple[CopyConfig, ...]
    log_dir: Path
    consul: ConsulConfig = ConsulConfig()
    service: ServiceConfig | None = None
    durable: bool = True
    zone: str = FIRST_ZONE
    rewrites: dict[str, str] = field(default_factory=dict)
    credentials: Credentials = field(default_factory=Credentials.generate)

    @property
    def host_key(self) -> str:
        """This host's name in the topology: its region, or region/zone."""
        return copy_key(self.region, self.zone)

    def physical(self, address: str) -> str:
        """The address to dial from this host for a database address of the map."""
        return self.rewrites.get(address, address)

    def copy(self, shard: str) -> CopyConfig | None:
        return next((c for c in self.copies if c.shard == shard), None)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], region: str | None = None) -> AgentConfig:
        try:
            region = region or str(doc["region"])
            if doc.get("region") not in (None, region):
                raise ConfigError(f"the config is for region {doc['region']}, not {region}")
            zone = str(doc.get("zone") or FIRST_ZONE)
            copies = tuple(
                CopyConfig(str(c["shard"]), str(c["name"]), Path(c["data_dir"]), int(c["port"]),
                           str(c.get("host", "127.0.0.1")), str(c.get("member") or copy_key(region, zone)))
                for c in doc.get("copies", [])
            )
            shards = [c.shard for c in copies]
            if len(set(shards)) != len(shards):
                raise ConfigError("one copy per shard per agent")
            service = doc.get("service")
            return cls(
                region=region,
                copies=copies,
                log_dir=Path(doc["log_dir"]),
                consul=ConsulConfig(**(doc.get("consul") or {})),
                service=ServiceConfig(tuple(str(a) for a in service["argv"]),
                                      {str(k): str(v) for k, v in (service.get("env") or {}).items()})
                if service else None,
                durable=bool(doc.get("durable", True)),
                zone=zone,
                rewrites={str(k): str(v) for k, v in (doc.get("rewrites") or {}).items()},
                credentials=Credentials.from_json(doc["postgres"]) if doc.get("postgres")
                else Credentials.generate(),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"invalid agent config: {exc!r}") from exc

    @classmethod
    def load(cls, path: Path, region: str | None = None) -> AgentConfig:
        text = path.read_text()
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: not a mapping")
        return cls.from_dict(doc, region)
