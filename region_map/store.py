"""The one interface every user of the region map programs against.

Like Patroni's `AbstractDCS`: the gateway, booking services and tools only
know `MapStore`; `ConsulMapStore` is a thin implementation on Consul KV.

Every write is check-and-set on the record's modify index, where 0 means "must
not exist yet": a lost race raises `CasConflict` and never overwrites. The
read-modify-write loops (`update_shard`, `move_event`) are written once, here,
on top of the primitive reads and writes.
"""

from __future__ import annotations

import asyncio
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from region_map.model import CasConflict, Region, RegionMap, Shard, shard_key

DEFAULT_ATTEMPTS = 16

# The names services register under in the registry.
BOOKING_SERVICE = "booking-service"
GATEWAY_SERVICE = "gateway"


@dataclass(frozen=True)
class ServiceInstance:
    """A registered instance; `passing` when every one of its health checks passes.
    `url` is the base URL it serves under, when it registered one (a booking service
    registers one instance per shard copy it serves, each with its copy's URL)."""

    service: str
    instance_id: str
    address: str
    port: int
    tags: tuple[str, ...]
    passing: bool = True
    url: str = ""


class MapStore(ABC):
    prefix: str = "boxoffice/"

    # -- reading -------------------------------------------------------------------
    @abstractmethod
    async def load(self) -> RegionMap:
        """The whole map, now."""

    @abstractmethod
    async def watch(self, index: int, wait_seconds: float = 30.0) -> RegionMap:
        """A blocking read: returns once the map changed after `index`, or when the wait is
        over (then possibly unchanged). `index` 0 returns at once."""

    @abstractmethod
    async def read_shard(self, name: str) -> tuple[Shard, int]:
        """One shard record and its modify index; `NotFound` if there is none."""

    @abstractmethod
    async def read_placement(self, event_id: str) -> tuple[str, int]:
        """The shard an event is placed on, and the placement's modify index; `NotFound`."""

    # -- check-and-set writes ----------------------------------------------------------
    @abstractmethod
    async def put_region(self, region: Region, expected_index: int) -> None: ...

    @abstractmethod
    async def put_shard(self, shard: Shard, expected_index: int) -> None: ...

    @abstractmethod
    async def place_event(self, event_id: str, shard: str, expected_index: int) -> None:
        """Place a new event (`expected_index` 0) or re-place a placed one (its current index)."""

    @abstractmethod
    async def unplace_event(self, event_id: str, expected_index: int) -> None:
        """Remove a placement, check-and-set on its modify index (> 0): `CasConflict` if
        it changed since; a placement already gone is left gone. Undoes a placement
        whose event was never created."""

    @abstractmethod
    async def delete_all(self) -> None:
        """Remove the whole map (tests, and resetting a local cluster)."""

    async def update_shard(
        self, name: str, change: Callable[[Shard], Shard], attempts: int = DEFAULT_ATTEMPTS
    ) -> Shard:
        """Read the shard, apply `change`, write it back with check-and-set.

        A lost race is retried from a fresh read, at most `attempts` times in all,
        then `CasConflict` is raised. `change` may run several times, so it must be
        a pure function of the shard it is given. With N concurrent updaters and no
        other writers, N attempts always suffice: each lost race is some other
        updater's one success. Returns the shard as written.
        """
        for attempt in range(1, attempts + 1):
            shard, index = await self.read_shard(name)
            updated = change(shard)
            if updated.name != name:
                raise ValueError(f"update of shard {name} renamed it to {updated.name}")
            if updated == shard:
                return shard
            try:
                await self.put_shard(updated, index)
                return updated
            except CasConflict:
                if attempt < attempts:  # de-synchronise the losers a little
                    await asyncio.sleep(random.uniform(0, 0.002 * attempt))
        raise CasConflict(self.prefix + shard_key(name), 0, attempts)

    async def move_event(self, event_id: str, to_shard: str, expected_index: int) -> None:
        """Re-place a placed event, check-and-set on its placement's modify index.

        `NotFound` if the event is not placed or the target shard does not exist;
        `CasConflict` if the placement changed since `expected_index`.
        """
        if expected_index <= 0:
            raise ValueError("moving an event needs its placement's current modify index")
        await self.read_shard(to_shard)
        try:
            await self.place_event(event_id, to_shard, expected_index)
        except CasConflict:
            await self.read_placement(event_id)  # NotFound tells more than a conflict
            raise

    # -- service registry --------------------------------------------------------
    @abstractmethod
    async def register_service(
        self, service: str, instance_id: str, address: str, port: int, tags: list[str],
        health_url: str, url: str = "",
    ) -> None:
        """Register an instance with an HTTP health check on `health_url`; `url`, if
        given, is the base URL the instance serves under (see `ServiceInstance.url`)."""

    @abstractmethod
    async def deregister_service(self, instance_id: str) -> None: ...

    @abstractmethod
    async def watch_healthy_instances(
        self, service: str, index: int, wait_seconds: float = 30.0
    ) -> tuple[int, list[ServiceInstance]]:
        """A blocking read of the passing instances: returns once they changed after
        `index` (0: at once), or when the wait is over; with the index to wait on next."""

    @abstractmethod
    async def watch_instances(
        self, service: str, index: int, wait_seconds: float = 30.0
    ) -> tuple[int, list[ServiceInstance]]:
        """Like `watch_healthy_instances`, but every registered instance, passing or not
        (each with `passing` set): returns once any instance's health changed."""

    async def healthy_instances(self, service: str) -> list[ServiceInstance]:
        """The instances of `service` whose health checks pass, now."""
        _, instances = await self.watch_healthy_instances(service, 0)
        return instances

    # -- lifetime ------------------------------------------------------------------
    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> MapStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
