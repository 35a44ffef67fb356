"""The one interface every user of the region map programs against.

Like Patroni's `AbstractDCS`: the gateway, booking services and tools only
know `MapStore`; `ConsulMapStore` is a thin implementation on Consul KV. Every
write is check-and-set on the key's modify index (0 = the key must not exist):
a lost race raises `CasConflict`, it never overwrites.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from region_map.model import CasConflict, NotFound, Region, RegionMap, Shard


@dataclass(frozen=True)
class ServiceInstance:
    service: str
    instance_id: str
    address: str
    port: int
    tags: tuple[str, ...]


class MapStore(ABC):
    # -- reading -----------------------------------------------------------------
    @abstractmethod
    async def load(self) -> RegionMap:
        """The whole map, now."""

    @abstractmethod
    async def watch(self, index: int, wait_seconds: float = 30.0) -> RegionMap:
        """A blocking read: returns once the map changed after `index`, or after the wait."""

    # -- check-and-set writes ------------------------------------------------------
    @abstractmethod
    async def put_region(self, region: Region, expected_index: int) -> None: ...

    @abstractmethod
    async def put_shard(self, shard: Shard, expected_index: int) -> None: ...

    @abstractmethod
    async def place_event(self, event_id: str, shard: str, expected_index: int) -> None:
        """Place a new event (`expected_index` 0) or move a placed one (its current index)."""

    @abstractmethod
    async def read_shard(self, name: str) -> tuple[Shard, int]:
        """One shard record and its modify index (raises `NotFound`)."""

    async def update_shard(
        self, name: str, change: Callable[[Shard], Shard], attempts: int = 10
    ) -> Shard:
        """Read, change, check-and-set; a lost race is retried from a fresh read."""
        for _ in range(attempts):
            shard, index = await self.read_shard(name)
            updated = change(shard)
            try:
                await self.put_shard(updated, index)
                return updated
            except CasConflict:
                continue
        raise CasConflict(self.shard_key(name), -1)

    async def move_event(self, event_id: str, to_shard: str, expected_index: int) -> None:
        current = await self.load()
        if event_id not in current.placements:
            raise NotFound(f"event {event_id} is not placed")
        if to_shard not in current.shards:
            raise NotFound(f"no shard {to_shard}")
        await self.place_event(event_id, to_shard, expected_index)

    @abstractmethod
    async def delete_all(self) -> None:
        """Remove the whole map (tests, and resetting a local cluster)."""

    # -- service registry ------------------------------------------------------
    @abstractmethod
    async def register_service(
        self, service: str, instance_id: str, address: str, port: int, tags: list[str],
        health_url: str,
    ) -> None: ...

    @abstractmethod
    async def deregister_service(self, instance_id: str) -> None: ...

    @abstractmethod
    async def healthy_instances(self, service: str) -> list[ServiceInstance]: ...

    @abstractmethod
    async def close(self) -> None: ...

    # -- key names (shared by implementations and error messages) -------------
    prefix: str = "boxoffice/"

    def region_key(self, name: str) -> str:
        return f"{self.prefix}regions/{name}"

    def shard_key(self, name: str) -> str:
        return f"{self.prefix}shards/{name}"

    def placement_key(self, event_id: str) -> str:
        return f"{self.prefix}placement/{event_id}"
