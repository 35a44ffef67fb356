"""The region map: regions, shards and event placement, kept in Consul KV."""

from region_map.consul_store import ConsulMapStore
from region_map.model import (
    CasConflict,
    MapError,
    NotFound,
    Region,
    RegionMap,
    Shard,
    ShardMember,
)
from region_map.store import MapStore, ServiceInstance
from region_map.watcher import MapWatcher

__all__ = [
    "CasConflict",
    "ConsulMapStore",
    "MapError",
    "MapStore",
    "MapWatcher",
    "NotFound",
    "Region",
    "RegionMap",
    "ServiceInstance",
    "Shard",
    "ShardMember",
]
