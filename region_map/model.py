"""The region map's data: regions, shards, placements. Immutable snapshots."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any

ROUTING_PREFIX_BYTES = 8  # a booking id shares this many leading bytes with its event id


class MapError(Exception):
    """Something about the map store went wrong."""


class CasConflict(MapError):
    """A check-and-set write lost: the key changed (or exists) since it was read."""

    def __init__(self, key: str, expected_index: int) -> None:
        super().__init__(
            f"check-and-set on {key!r} lost: it no longer has modify index {expected_index}"
            if expected_index
            else f"check-and-set on {key!r} lost: it already exists"
        )
        self.key = key
        self.expected_index = expected_index


class NotFound(MapError):
    pass


@dataclass(frozen=True)
class Region:
    name: str
    gateway_url: str
    location: str
    latency_ms: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "gatewayUrl": self.gateway_url, "location": self.location,
                "latencyMs": dict(self.latency_ms)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Region:
        return cls(doc["name"], doc["gatewayUrl"], doc.get("location", ""),
                   {k: int(v) for k, v in (doc.get("latencyMs") or {}).items()})

    def nearest(self, regions: list[str]) -> list[str]:
        """`regions` ordered by distance from this one (itself first)."""
        return sorted(regions, key=lambda r: (r != self.name, self.latency_ms.get(r, 10_000), r))


@dataclass(frozen=True)
class ShardMember:
    """A shard's copy in one region: its booking service and its database."""

    region: str
    service_url: str
    db_address: str

    def to_json(self) -> dict[str, Any]:
        return {"region": self.region, "serviceUrl": self.service_url, "dbAddress": self.db_address}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ShardMember:
        return cls(doc["region"], doc["serviceUrl"], doc["dbAddress"])


@dataclass(frozen=True)
class Shard:
    """One shard: the primary lives in `primary_region` (its home), every other member
    is a streaming replica. `epoch` grows at every change of primary."""

    name: str
    epoch: int
    primary_region: str
    members: dict[str, ShardMember]

    def __post_init__(self) -> None:
        if self.primary_region not in self.members:
            raise ValueError(f"shard {self.name}: primary region {self.primary_region} has no member")

    @property
    def home_region(self) -> str:
        return self.primary_region

    @property
    def primary(self) -> ShardMember:
        return self.members[self.primary_region]

    def replica_in(self, region: str) -> ShardMember | None:
        return None if region == self.primary_region else self.members.get(region)

    @property
    def replicas(self) -> dict[str, ShardMember]:
        return {r: m for r, m in self.members.items() if r != self.primary_region}

    def with_primary(self, region: str) -> Shard:
        """The shard after promoting its copy in `region`: the epoch grows."""
        if region not in self.members:
            raise ValueError(f"shard {self.name} has no member in {region}")
        return replace(self, primary_region=region, epoch=self.epoch + 1)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "epoch": self.epoch, "primaryRegion": self.primary_region,
                "members": {r: m.to_json() for r, m in self.members.items()}}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Shard:
        return cls(doc["name"], int(doc["epoch"]), doc["primaryRegion"],
                   {r: ShardMember.from_json(m) for r, m in doc["members"].items()})


@dataclass(frozen=True)
class RegionMap:
    """A complete, consistent snapshot of the map at one Consul index."""

    regions: dict[str, Region] = field(default_factory=dict)
    shards: dict[str, Shard] = field(default_factory=dict)
    placements: dict[str, str] = field(default_factory=dict)  # event id -> shard name
    index: int = 0
    key_indexes: dict[str, int] = field(default_factory=dict)  # store key -> modify index
    _by_prefix: dict[bytes, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_prefix: dict[bytes, str] = {}
        for event_id in self.placements:
            try:
                by_prefix[uuid.UUID(event_id).bytes[:ROUTING_PREFIX_BYTES]] = event_id
            except ValueError:
                continue
        object.__setattr__(self, "_by_prefix", by_prefix)

    def shard_for_event(self, event_id: str) -> Shard | None:
        name = self.placements.get(event_id)
        return self.shards.get(name) if name is not None else None

    def event_ids(self) -> list[str]:
        return list(self.placements)

    def event_for_prefix(self, prefix: bytes) -> str | None:
        """The event whose id starts with `prefix` (the leading bytes of a booking id)."""
        return self._by_prefix.get(prefix[:ROUTING_PREFIX_BYTES])

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "regions": {n: r.to_json() for n, r in self.regions.items()},
            "shards": {n: s.to_json() for n, s in self.shards.items()},
            "placements": dict(self.placements),
        }
