"""The topology YAML: regions, distances, shards, and the ports they use."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from region_map import FIRST_ZONE, copy_key

DEFAULT_TOPOLOGY = Path(__file__).with_name("topology.yaml")


@dataclass(frozen=True)
class ClientRegionRule:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    region: str


SYNC_MODES = ("zone", "region", "off")
DEFAULT_SYNC = "zone"
SECOND_ZONE = "b"


@dataclass(frozen=True)
class Host:
    """One place processes run: a zone of a region (one node agent, one booking service,
    the Postgres copies placed there). Named like a copy: `copy_key(region, zone)`."""

    region: str
    zone: str = FIRST_ZONE

    @property
    def key(self) -> str:
        return copy_key(self.region, self.zone)

    @property
    def slug(self) -> str:
        """The key as a file- and process-name part (`us-east-b`)."""
        return self.key.replace("/", "-")


@dataclass(frozen=True)
class ControllerSettings:
    """The failover controllers (`python -m failover`, one per region) of `controller:`.
    Off unless a topology switches them on (the default topology.yaml does; test
    clusters that stop copies on purpose keep them off)."""

    enabled: bool = False
    grace_ms: float = 400.0  # a primary down this long past detection is failed over
    lock_ttl_seconds: float = 1.0  # the controller lock's session TTL


@dataclass(frozen=True)
class PrometheusSettings:
    """`prometheus:` a Prometheus beside the cluster (deploy/prometheus.py), scraping every
    process it finds in Consul, with deploy/prometheus/rules.yml loaded. Off unless a
    topology switches it on (the default topology.yaml does)."""

    enabled: bool = False


@dataclass(frozen=True)
class Topology:
    """Regions, their distances, shards (home region and durability), tunables.

    Every shard has a copy in the first zone of every region (the primary in its
    home region, a streaming replica elsewhere). `sync` says what a confirmed
    booking survives:
    - `zone` (default): the home region also holds a copy in a second zone (`b`),
      the synchronous standby, `zone_latency_ms` away; other regions' replicas are
      asynchronous. Survives the loss of the primary's zone.
    - `region`: quorum `ANY 1` of the other regions' replicas; survives the loss of
      a whole region, at a cross-region round trip per commit.
    - `off`: asynchronous replication only.
    """

    name: str
    base_port: int
    regions: dict[str, str]  # name -> location
    latency_ms: dict[frozenset[str], int]
    shards: dict[str, str]  # name -> home region
    client_regions: tuple[ClientRegionRule, ...] = ()
    postgres: dict[str, Any] = field(default_factory=dict)
    gateway: dict[str, float] = field(default_factory=dict)
    sync_modes: dict[str, str] = field(default_factory=dict)  # shard -> sync mode
    zone_latency_ms: int = 1
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    prometheus: PrometheusSettings = field(default_factory=PrometheusSettings)

    def latency(self, a: str, b: str) -> int:
        return 0 if a == b else self.latency_ms.get(frozenset((a, b)), 0)

    def sync_mode(self, shard: str) -> str:
        return self.sync_modes.get(shard, DEFAULT_SYNC)

    def copies(self, shard: str) -> list[Host]:
        """Where the shard's copies live: its primary's host first."""
        home = self.shards[shard]
        hosts = [Host(home)] + [Host(r) for r in self.regions if r != home]
        if self.sync_mode(shard) == "zone":
            hosts.append(Host(home, SECOND_ZONE))
        return hosts

    def sync_standbys(self, shard: str) -> list[str]:
        """The copy keys of the primary's synchronous standby set at start."""
        mode, home = self.sync_mode(shard), self.shards[shard]
        if mode == "zone":  # FIRST 1: the zone standby, else (its zone lost) another region's
            return [copy_key(home, SECOND_ZONE)] + [copy_key(r) for r in self.regions if r != home]
        if mode == "region":
            return [copy_key(r) for r in self.regions if r != home]
        return []

    @property
    def hosts(self) -> list[Host]:
        """Every host that holds a copy of some shard, by region then zone."""
        found = {h for s in self.shards for h in self.copies(s)}
        order = list(self.regions)
        return sorted(found, key=lambda h: (order.index(h.region), h.zone))

    def host_latency(self, a: Host, b: Host) -> int:
        """Simulated one-way delay between two hosts (zones of one region are close)."""
        if a == b:
            return 0
        if a.region == b.region:
            return self.zone_latency_ms
        return self.latency(a.region, b.region)

    def latency_table(self, region: str) -> dict[str, int]:
        return {other: self.latency(region, other) for other in self.regions}

    @property
    def region_names(self) -> list[str]:
        return list(self.regions)

    @property
    def shard_names(self) -> list[str]:
        return list(self.shards)

    def with_base_port(self, base_port: int) -> Topology:
        return dataclasses.replace(self, base_port=base_port)


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
    "read_lag_ms": "--read-lag-ms",
    "booking_lag_ms": "--booking-lag-ms",
}
# What each setting must be (anything else: positive seconds). 0 switches a limit off.
_GATEWAY_SETTING_KINDS = {
    "booking_rate_per_second": ("a number >= 0 (0: no limit)", 0.0, float),
    "booking_burst": ("a whole number >= 1", 1, int),
    "max_in_flight_reads": ("a whole number >= 0 (0: no limit)", 0, int),
    "max_in_flight_bookings": ("a whole number >= 0 (0: no limit)", 0, int),
    "read_queue_ms": ("a number of milliseconds >= 0", 0.0, float),
    "booking_queue_ms": ("a number of milliseconds >= 0", 0.0, float),
    "read_lag_ms": ("a number of milliseconds >= 0 (0: off)", 0.0, float),
    "booking_lag_ms": ("a number of milliseconds >= 0 (0: off)", 0.0, float),
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


def _controller_settings(doc: Any) -> ControllerSettings:
    if doc is None:
        return ControllerSettings()
    if not isinstance(doc, dict) or set(doc) - {"enabled", "grace_ms", "lock_ttl_seconds"}:
        raise TopologyError("controller: a mapping of enabled, grace_ms, lock_ttl_seconds")
    enabled = doc.get("enabled", False)
    if not isinstance(enabled, bool):
        raise TopologyError("controller: enabled must be true or false")
    numbers = {}
    for key, default, minimum in (("grace_ms", 400, 0), ("lock_ttl_seconds", 1, 1)):
        value = doc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or value < minimum:
            raise TopologyError(f"controller: {key} must be a number >= {minimum}")
        numbers[key] = float(value)
    return ControllerSettings(enabled, numbers["grace_ms"], numbers["lock_ttl_seconds"])


def _prometheus_settings(doc: Any) -> PrometheusSettings:
    if doc is None:
        return PrometheusSettings()
    if not isinstance(doc, dict) or set(doc) - {"enabled"} or not isinstance(doc.get("enabled", False), bool):
        raise TopologyError("prometheus: a mapping of enabled: true or false")
    return PrometheusSettings(bool(doc.get("enabled", False)))


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
    sync_modes: dict[str, str] = {}
    for name, spec in (doc.get("shards") or {}).items():
        home = str((spec or {}).get("home", ""))
        if home not in regions:
            raise TopologyError(f"shard {name}: home region {home!r} is not a region")
        shards[str(name)] = home
        sync = (spec or {}).get("sync", DEFAULT_SYNC)
        if sync is False:  # YAML reads a bare `off` as false
            sync = "off"
        if sync not in SYNC_MODES:
            raise TopologyError(f"shard {name}: sync must be one of {', '.join(SYNC_MODES)}")
        if sync == "region" and len(regions) < 2:
            raise TopologyError(f"shard {name}: sync: region needs another region")
        sync_modes[str(name)] = str(sync)
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
        sync_modes=sync_modes,
        zone_latency_ms=int(doc.get("zone_latency_ms", 1)),
        controller=_controller_settings(doc.get("controller")),
        prometheus=_prometheus_settings(doc.get("prometheus")),
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
