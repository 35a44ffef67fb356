"""Where a request goes: pure functions over the region map (no I/O)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from region_map import RegionMap, Shard, ShardMember

REGION_HEADER = "X-Boxoffice-Region"


@dataclass(frozen=True)
class ClientRule:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    region: str


def client_region(
    header_value: str | None,
    remote: str | None,
    rules: Sequence[ClientRule],
    known_regions: Sequence[str],
    default: str,
) -> str:
    """The client's region: an explicit header, else the longest matching prefix, else ours."""
    if header_value and header_value in known_regions:
        return header_value
    if remote:
        try:
            addr = ipaddress.ip_address(remote)
        except ValueError:
            addr = None
        if addr is not None:
            matches = [r for r in rules if addr.version == r.network.version and addr in r.network]
            if matches:
                best = max(matches, key=lambda r: r.network.prefixlen)
                if best.region in known_regions:
                    return best.region
    return default


def regions_by_distance(region_map: RegionMap, origin: str) -> list[str]:
    """All regions, nearest first (the origin itself first)."""
    origin_region = region_map.regions.get(origin)
    latency = origin_region.latency_ms if origin_region else {}
    return sorted(region_map.regions, key=lambda r: (r != origin, latency.get(r, 10_000), r))


def read_order(
    region_map: RegionMap,
    shard: Shard,
    origin: str,
    failing: Callable[[ShardMember], bool] | None = None,
) -> list[ShardMember]:
    """The copies of a shard to read from, nearest to `origin` first; copies whose
    service is `failing` (its health checks fail) after all the others, still in
    distance order (last resorts: a health view can be stale)."""
    order = regions_by_distance(region_map, origin)
    members = [m for r in order for m in shard.copies_in(r)]  # within a region: primary first
    members += [m for _, m in sorted(shard.members.items()) if m.region not in order]
    if failing is not None:
        members.sort(key=failing)  # stable: distance order within each group
    return members
