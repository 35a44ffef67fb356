"""The topology YAML: regions, distances, shards, and the ports they use.

The YAML is read into msgspec types (`TopologyDoc` and its parts: strict, every error
naming its field), then checked for what types cannot say and turned into `Topology`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import yaml
from msgspec import UNSET, Meta, Struct, UnsetType

from common.messages import refusal
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
        if mode == "zone":  # FIRST 1: the zone standby, else (its zone lost) the nearest region's
            others = sorted((r for r in self.regions if r != home),
                            key=lambda r: (self.latency(home, r), list(self.regions).index(r)))
            return [copy_key(home, SECOND_ZONE)] + [copy_key(r) for r in others]
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


# -- the YAML document, as msgspec types ---------------------------------------------------
# Converted strictly (msgspec.convert: `true` is not a number, "64" not an integer);
# regions and shards entry by entry, so that an error names its region or shard. What
# the types cannot say (known regions, finite numbers, prefixes) parse_topology checks.

Seconds = Annotated[float, Meta(gt=0, description="a positive number of seconds")]
Milliseconds = Annotated[float, Meta(ge=0, description="a number of milliseconds >= 0")]
LagMilliseconds = Annotated[float, Meta(ge=0, description="a number of milliseconds >= 0 (0: off)")]
Slots = Annotated[int, Meta(ge=0, description="a whole number >= 0 (0: no limit)")]


class GatewaySettings(Struct, forbid_unknown_fields=True):
    """`gateway:` the gateway's tunables (each also a `python -m gateway` flag)."""

    cache_ttl_seconds: Seconds | UnsetType = UNSET
    write_retry_seconds: Seconds | UnsetType = UNSET
    write_attempt_seconds: Seconds | UnsetType = UNSET
    booking_rate_per_second: Annotated[float, Meta(
        ge=0, description="a number >= 0 (0: no limit)")] | UnsetType = UNSET
    booking_burst: Annotated[int, Meta(ge=1, description="a whole number >= 1")] | UnsetType = UNSET
    max_in_flight_reads: Slots | UnsetType = UNSET
    max_in_flight_bookings: Slots | UnsetType = UNSET
    read_queue_ms: Milliseconds | UnsetType = UNSET
    booking_queue_ms: Milliseconds | UnsetType = UNSET
    read_lag_ms: LagMilliseconds | UnsetType = UNSET
    booking_lag_ms: LagMilliseconds | UnsetType = UNSET


class ControllerSpec(Struct, forbid_unknown_fields=True):
    enabled: bool = False
    grace_ms: Annotated[float, Meta(ge=0, description="a number >= 0")] = 400.0
    lock_ttl_seconds: Annotated[float, Meta(ge=1, description="a number >= 1")] = 1.0


class PrometheusSpec(Struct, forbid_unknown_fields=True):
    enabled: bool = False


class RegionSpec(Struct):
    location: str | None = None


class ShardSpec(Struct):
    home: Annotated[str, Meta(description="the name of a region")]
    # YAML reads a bare `off` as false.
    sync: Literal["zone", "region", "off"] | bool = DEFAULT_SYNC


class ClientRegionSpec(Struct):
    prefix: Annotated[str, Meta(description="an IP network (10.20.0.0/16)")]
    region: str


class TopologyDoc(Struct):
    name: str = "boxoffice"
    base_port: Annotated[int, Meta(ge=1, le=65535)] = 18500
    regions: dict[str, Any] | None = None  # name -> RegionSpec (or null)
    latency_ms: dict[str, Annotated[int, Meta(ge=0)]] | None = None
    shards: dict[str, Any] | None = None  # name -> ShardSpec
    client_regions: list[ClientRegionSpec] | None = None
    postgres: dict[str, Any] | None = None
    gateway: GatewaySettings | None = None
    zone_latency_ms: Annotated[int, Meta(ge=0)] = 1
    controller: ControllerSpec | None = None
    prometheus: PrometheusSpec | None = None


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
assert set(GATEWAY_SETTINGS) == set(GatewaySettings.__struct_fields__)

T = TypeVar("T")


def _convert(value: Any, kind: type[T], where: str = "") -> T:
    """`value` as `kind`, strictly, or a TopologyError naming the field (`where` first)."""
    try:
        return msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError as exc:
        refused = refusal(kind, exc)
        field = ".".join(p for p in (where, refused.field) if p)
        if not field:
            raise TopologyError("topology: the document must be a mapping") from None
        raise TopologyError(f"topology: {dataclasses.replace(refused, field=field).detail()}") from None


def _finite(where: str, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise TopologyError(f"topology: {where}.{key} must be a finite number.")


def _gateway_settings(spec: GatewaySettings | None) -> dict[str, float]:
    if spec is None:
        return {}
    settings = {k: getattr(spec, k) for k in GATEWAY_SETTINGS if getattr(spec, k) is not UNSET}
    _finite("gateway", settings)
    return settings


def _controller_settings(spec: ControllerSpec | None) -> ControllerSettings:
    if spec is None:
        return ControllerSettings()
    _finite("controller", msgspec.structs.asdict(spec))
    return ControllerSettings(spec.enabled, spec.grace_ms, spec.lock_ttl_seconds)


def parse_topology(raw: dict[str, Any]) -> Topology:
    doc = _convert(raw, TopologyDoc)
    if not doc.regions:
        raise TopologyError("topology needs at least one region")
    regions: dict[str, str] = {}
    for name, spec in (doc.regions or {}).items():
        region = _convert(spec or {}, RegionSpec, f"regions.{name}")
        regions[name] = region.location or name
    latency: dict[frozenset[str], int] = {}
    for pair, ms in (doc.latency_ms or {}).items():
        a, sep, b = pair.partition("/")
        if not sep or a not in regions or b not in regions:
            raise TopologyError(f"latency_ms key {pair!r} must be 'region/region' of known regions")
        latency[frozenset((a, b))] = ms
    shards: dict[str, str] = {}
    sync_modes: dict[str, str] = {}
    for name, raw_spec in (doc.shards or {}).items():
        spec = _convert(raw_spec, ShardSpec, f"shards.{name}")
        if spec.home not in regions:
            raise TopologyError(f"shard {name}: home region {spec.home!r} is not a region")
        sync = "off" if spec.sync is False else spec.sync
        if sync not in SYNC_MODES:
            raise TopologyError(f"shard {name}: sync must be one of {', '.join(SYNC_MODES)}")
        if sync == "region" and len(regions) < 2:
            raise TopologyError(f"shard {name}: sync: region needs another region")
        shards[name] = spec.home
        sync_modes[name] = str(sync)
    if not shards:
        raise TopologyError("topology needs at least one shard")
    rules = []
    for n, rule in enumerate(doc.client_regions or []):
        if rule.region not in regions:
            raise TopologyError(f"client_regions: unknown region {rule.region!r}")
        try:
            network = ipaddress.ip_network(rule.prefix)
        except ValueError:
            raise TopologyError(f"topology: client_regions[{n}].prefix must be an IP network "
                                f"(10.20.0.0/16), not {rule.prefix!r}") from None
        rules.append(ClientRegionRule(network, rule.region))
    return Topology(
        name=doc.name,
        base_port=doc.base_port,
        regions=regions,
        latency_ms=latency,
        shards=shards,
        client_regions=tuple(rules),
        postgres=dict(doc.postgres or {}),
        gateway=_gateway_settings(doc.gateway),
        sync_modes=sync_modes,
        zone_latency_ms=doc.zone_latency_ms,
        controller=_controller_settings(doc.controller),
        prometheus=PrometheusSettings(doc.prometheus.enabled if doc.prometheus else False),
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
