"""The region map: regions, shards and event placement, kept in Consul KV.

Program against `MapStore` (`ConsulMapStore` implements it) and read the map
through a `MapWatcher`; see docs/region-map.md.
"""

from region_map.consul_store import ConsulMapStore
from region_map.health import HealthWatcher, passing_by_url
from region_map.model import (
    ROUTING_PREFIX_BYTES,
    CasConflict,
    MapError,
    NotFound,
    Placement,
    Region,
    RegionMap,
    Shard,
    ShardMember,
)
from region_map.store import BOOKING_SERVICE, GATEWAY_SERVICE, MapStore, ServiceInstance
from region_map.watcher import MapWatcher

__all__ = [
    "BOOKING_SERVICE",
    "GATEWAY_SERVICE",
    "ROUTING_PREFIX_BYTES",
    "CasConflict",
    "ConsulMapStore",
    "HealthWatcher",
    "MapError",
    "MapStore",
    "MapWatcher",
    "NotFound",
    "Placement",
    "Region",
    "RegionMap",
    "ServiceInstance",
    "Shard",
    "ShardMember",
    "passing_by_url",
]
