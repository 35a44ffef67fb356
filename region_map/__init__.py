"""The region map: regions, shards and event placement, kept in Consul KV.

Program against `MapStore` (`ConsulMapStore` implements it) and read the map
through a `MapWatcher`; see docs/region-map.md.
"""

from region_map.consul_store import CONSUL_TOKEN_ENV, ConsulMapStore
from region_map.health import HealthWatcher, passing_by_url
from region_map.model import (
    FIRST_ZONE,
    ROUTING_PREFIX_BYTES,
    SYNC_MODES,
    CasConflict,
    EpochRuleViolation,
    MapError,
    NotFound,
    Placement,
    Region,
    RegionMap,
    SessionGone,
    Shard,
    ShardMember,
    check_epoch_rules,
    copy_key,
)
from region_map.store import (
    BOOKING_SERVICE,
    GATEWAY_SERVICE,
    NODE_AGENT_SERVICE,
    LockState,
    MapStore,
    ServiceInstance,
    ops_prefix_for,
)
from region_map.watcher import MapWatcher

__all__ = [
    "BOOKING_SERVICE",
    "CONSUL_TOKEN_ENV",
    "FIRST_ZONE",
    "GATEWAY_SERVICE",
    "NODE_AGENT_SERVICE",
    "ROUTING_PREFIX_BYTES",
    "SYNC_MODES",
    "CasConflict",
    "ConsulMapStore",
    "EpochRuleViolation",
    "HealthWatcher",
    "LockState",
    "MapError",
    "MapStore",
    "MapWatcher",
    "NotFound",
    "Placement",
    "Region",
    "RegionMap",
    "ServiceInstance",
    "SessionGone",
    "Shard",
    "ShardMember",
    "check_epoch_rules",
    "copy_key",
    "ops_prefix_for",
    "passing_by_url",
]
