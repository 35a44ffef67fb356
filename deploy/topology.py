"""The topology YAML: regions, distances, shards, and the ports they use."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TOPOLOGY = Path(__file__).with_name("topology.yaml")


@dataclass(frozen=True)
class ClientRegionRule:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    region: str


@dataclass(frozen=True)
class Topology:
    name: str
    base_port: int
    regions: dict[str, str]  # name -> location
    latency_ms: dict[frozenset[str], int]
    shards: dict[str, str]  # name -> home region
    client_regions: tuple[ClientRegionRule, ...] = ()
    postgres: dict[str, Any] = field(default_factory=dict)
    gateway: dict[str, float] = field(default_factory=dict)

    def latency(self, a: str, b: str) -> int:
        return 0 if a == b else self.latency_ms.get(frozenset((a, b)), 0)

    def latency_table(self, region: str) -> dict[str, int]:
        return {other: self.latency(region, other) for other in self.regions}

    @property
    def region_names(self) -> list[str]:
        return list(self.regions)

    @property
    def shard_names(self) -> list[str]:
        return list(self.shards)

    def with_base_port(self, base_port: int) -> Topology:
        return Topology(self.name, base_port, self.regions, self.latency_ms, self.shards,
                        self.client_regions, self.postgres, self.gateway)


class TopologyError(ValueError):
    pass


# The gateway's tunables a topology may set, as `python -m gateway` flags.
GATEWAY_SETTINGS = {
    "cache_ttl_seconds": "--cache-ttl",
    "write_retry_seconds": "--write-retry-seconds",
    "write_attempt_seconds": "--write-attempt-seconds",
    "booking_rate_per_second": "--booking-rate",
    "booking_burst": "--booking-burst",
    "max_in_flight_reads": "--max-in-flight-reads",
    "max_in_flight_bookings": "--max-in-flight-bookings",
    "read_queue_ms": "--read-queue-ms",
    "booking_queue_ms": "--booking-queue-ms",
}
# What each setting must be (anything else: positive seconds). 0 switches a limit off.
_GATEWAY_SETTING_KINDS = {
    "booking_rate_per_second": ("a number >= 0 (0: no limit)", 0.0, float),
    "booking_burst": ("a whole number >= 1", 1, int),
    "max_in_flight_reads": ("a whole number >= 0 (0: no limit)", 0, int),
    "max_in_flight_bookings": ("a whole number >= 0 (0: no limit)", 0, int),
    "read_queue_ms": ("a number of milliseconds >= 0", 0.0, float),
    "booking_queue_ms": ("a number of milliseconds >= 0", 0.0, float),
}


def _gateway_setting(key: str, value: Any) -> float:
    if key not in GATEWAY_SETTINGS:
        raise TopologyError(f"gateway: unknown setting {key!r} (known: {', '.join(GATEWAY_SETTINGS)})")
    what, minimum, kind = _GATEWAY_SETTING_KINDS.get(key, ("a positive number of seconds", None, float))
    valid = (not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
             and (kind is float or value == int(value))
             and (value > 0 if minimum is None else value >= minimum))
    if not valid:
        raise TopologyError(f"gateway: {key} must be {what}")
    return kind(value)


def parse_topology(doc: dict[str, Any]) -> Topology:
    regions_in = doc.get("regions") or {}
    if not isinstance(regions_in, dict) or not regions_in:
        raise TopologyError("topology needs at least one region")
    regions = {str(name): str((spec or {}).get("location", name)) for name, spec in regions_in.items()}
    latency: dict[frozenset[str], int] = {}
    for pair, ms in (doc.get("latency_ms") or {}).items():
        a, sep, b = str(pair).partition("/")
        if not sep or a not in regions or b not in regions:
            raise TopologyError(f"latency_ms key {pair!r} must be 'region/region' of known regions")
        latency[frozenset((a, b))] = int(ms)
    shards: dict[str, str] = {}
    for name, spec in (doc.get("shards") or {}).items():
        home = str((spec or {}).get("home", ""))
        if home not in regions:
            raise TopologyError(f"shard {name}: home region {home!r} is not a region")
        shards[str(name)] = home
    if not shards:
        raise TopologyError("topology needs at least one shard")
    rules = []
    for rule in doc.get("client_regions") or []:
        if rule["region"] not in regions:
            raise TopologyError(f"client_regions: unknown region {rule['region']!r}")
        rules.append(ClientRegionRule(ipaddress.ip_network(rule["prefix"]), rule["region"]))
    gateway: dict[str, float] = {}
    for key, value in (doc.get("gateway") or {}).items():
        gateway[str(key)] = _gateway_setting(key, value)
    return Topology(
        name=str(doc.get("name", "boxoffice")),
        base_port=int(doc.get("base_port", 18500)),
        regions=regions,
        latency_ms=latency,
        shards=shards,
        client_regions=tuple(rules),
        postgres=dict(doc.get("postgres") or {}),
        gateway=gateway,
    )


def load_topology(path: Path | None = None) -> Topology:
    with open(path or DEFAULT_TOPOLOGY) as fh:
        return parse_topology(yaml.safe_load(fh) or {})


class PortPlan:
    """Ports handed out in order from the topology's base port (or from the OS)."""

    def __init__(self, base_port: int | None) -> None:
        self.next = base_port

    def take(self) -> int:
        if self.next is None:
            from deploy.procs import free_port

            return free_port()
        port = self.next
        self.next += 1
        return port
