"""The one interface every user of the region map programs against.

Like Patroni's `AbstractDCS`: the gateway, booking services and tools only
know `MapStore`; `ConsulMapStore` is a thin implementation on Consul KV.

Every write is check-and-set on the record's modify index, where 0 means "must
not exist yet": a lost race raises `CasConflict` and never overwrites. The
read-modify-write loops (`update_shard`, `move_event`) and the epoch rules
(`put_shard`) are written once, here, on top of the primitive reads and writes.

Beside the map, under `ops_prefix` (a sibling prefix that readers of the map do
not watch, so nothing written there wakes a gateway), live operation journals
(plain JSON documents, check-and-set like the map) and leader locks held
through the store's sessions (leases with a TTL).
"""

from __future__ import annotations

import asyncio
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple

from region_map.model import (
    CasConflict,
    NotFound,
    Region,
    RegionMap,
    Shard,
    check_epoch_rules,
    shard_key,
)

DEFAULT_ATTEMPTS = 16

# The names services register under in the registry.
BOOKING_SERVICE = "booking-service"
GATEWAY_SERVICE = "gateway"
NODE_AGENT_SERVICE = "node-agent"


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
    meta: Mapping[str, str] = field(default_factory=dict)  # what it registered besides `url`


class LockState(NamedTuple):
    """A lock key as the store has it: the session holding it (None: free), the value
    its last holder wrote (kept after a release), and the index to block on next (the
    `index` of the next `watch_lock`; not named `index`, which would hide `tuple.index`)."""

    session: str | None
    value: dict[str, Any] | None
    watch_index: int


def ops_prefix_for(prefix: str) -> str:
    """The operations prefix beside a map prefix: 'boxoffice/' -> 'boxoffice-ops/'.

    A sibling, not a child: a recursive read of the map prefix never includes it,
    so journal and lock writes never wake a map watcher."""
    return prefix.rstrip("/") + "-ops/"


class MapStore(ABC):
    prefix: str = "boxoffice/"
    ops_prefix: str = "boxoffice-ops/"

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

    async def read_regions(self) -> dict[str, Region]:
        """The region records alone (their latency figures order a new primary's
        synchronous fallbacks: failover/promote.py `next_sync_set`), without the
        placements a whole `load` would read."""
        return dict((await self.load()).regions)

    @abstractmethod
    async def read_placement(self, event_id: str) -> tuple[str, int]:
        """The shard an event is placed on, and the placement's modify index; `NotFound`."""

    # -- check-and-set writes ----------------------------------------------------------
    @abstractmethod
    async def put_region(self, region: Region, expected_index: int) -> None: ...

    async def put_shard(self, shard: Shard, expected_index: int) -> None:
        """Write a shard record with check-and-set, under the epoch rules.

        `expected_index` 0 creates the record (any epoch >= 1). Otherwise the stored
        record is read with its index; if that is not `expected_index` the write has
        lost (`CasConflict`); the rules (`check_epoch_rules`: a change of primary
        carries exactly epoch + 1, the same primary keeps its epoch) are checked
        against that record, and it is replaced by a check-and-set on that same
        index. So the record the rules were checked against is exactly the one
        replaced: anything written in between makes the check-and-set lose, and
        read-check-write is atomic. A violation raises `EpochRuleViolation` and
        writes nothing. A stored record that cannot be read (malformed) cannot be
        checked, so it is not replaced (`MapError`).
        """
        if expected_index < 0:
            raise ValueError(f"expected index must be >= 0, not {expected_index}")
        stored: Shard | None = None
        if expected_index:
            try:
                stored, index = await self.read_shard(shard.name)
            except NotFound:
                raise CasConflict(self.prefix + shard_key(shard.name), expected_index) from None
            if index != expected_index:
                raise CasConflict(self.prefix + shard_key(shard.name), expected_index)
        await self._put_shard_over(stored, shard, expected_index)

    async def _put_shard_over(self, stored: Shard | None, shard: Shard, index: int) -> None:
        """Check the rules against `stored` (the record at `index`, None for 0) and write."""
        check_epoch_rules(stored, shard)
        await self._write_shard(shard, index)

    @abstractmethod
    async def _write_shard(self, shard: Shard, expected_index: int) -> None:
        """The raw check-and-set write of a shard record (`put_shard` checks the rules)."""

    @abstractmethod
    async def place_event(self, event_id: str, shard: str, expected_index: int,
                          since_lsn: str | None = None) -> None:
        """Place a new event (`expected_index` 0) or re-place a placed one (its current index);
        `since_lsn` as in `Placement`."""

    @abstractmethod
    async def unplace_event(self, event_id: str, expected_index: int) -> None:
        """Remove a placement, check-and-set on its modify index (> 0): `CasConflict` if
        it changed since; a placement already gone is left gone. Undoes a placement
        whose event was never created."""

    @abstractmethod
    async def delete_all(self) -> None:
        """Remove the whole map, and the journals and locks beside it (tests, and
        resetting a local cluster)."""

    async def update_shard(
        self, name: str, change: Callable[[Shard], Shard], attempts: int = DEFAULT_ATTEMPTS
    ) -> Shard:
        """Read the shard, apply `change`, write it back with check-and-set.

        A lost race is retried from a fresh read, at most `attempts` times in all,
        then `CasConflict` is raised. `change` may run several times, so it must be
        a pure function of the shard it is given. With N concurrent updaters and no
        other writers, N attempts always suffice: each lost race is some other
        updater's one success. Returns the shard as written.

        The result must obey the epoch rules against the shard `change` was given
        (`put_shard`); `EpochRuleViolation` is raised at once, not retried.
        """
        for attempt in range(1, attempts + 1):
            shard, index = await self.read_shard(name)
            updated = change(shard)
            if updated.name != name:
                raise ValueError(f"update of shard {name} renamed it to {updated.name}")
            if updated == shard:
                return shard
            try:
                await self._put_shard_over(shard, updated, index)  # `shard` is the record at `index`
                return updated
            except CasConflict:
                if attempt < attempts:  # de-synchronise the losers a little
                    await asyncio.sleep(random.uniform(0, 0.002 * attempt))
        raise CasConflict(self.prefix + shard_key(name), 0, attempts)

    async def move_event(self, event_id: str, to_shard: str, expected_index: int,
                         since_lsn: str | None = None) -> None:
        """Re-place a placed event, check-and-set on its placement's modify index: the
        commit point of an event move (event_ops/move.py). `since_lsn`: the target
        primary's position once the event's rows were all there (`Placement`).

        `NotFound` if the event is not placed or the target shard does not exist;
        `CasConflict` if the placement changed since `expected_index`.
        """
        if expected_index <= 0:
            raise ValueError("moving an event needs its placement's current modify index")
        await self.read_shard(to_shard)
        try:
            await self.place_event(event_id, to_shard, expected_index, since_lsn)
        except CasConflict:
            await self.read_placement(event_id)  # NotFound tells more than a conflict
            raise

    # -- operation journals, under ops_prefix ---------------------------------------
    @abstractmethod
    async def put_journal(self, op_id: str, doc: dict[str, Any], expected_index: int) -> int:
        """Write an operation's journal with check-and-set (0: create); returns its new
        modify index, the `expected_index` of the next step. `CasConflict` if the journal
        changed (or, for 0, exists) since: another runner of the operation got there
        first. The document is the operation's own (its steps, its state)."""

    @abstractmethod
    async def read_journal(self, op_id: str) -> tuple[dict[str, Any], int]:
        """An operation's journal and its modify index; `NotFound`."""

    @abstractmethod
    async def list_journals(self, kind_prefix: str = "") -> dict[str, tuple[dict[str, Any], int]]:
        """Every journal whose operation id starts with `kind_prefix` ("promote-", say),
        by operation id, each with its modify index."""

    @abstractmethod
    async def delete_journal(self, op_id: str, expected_index: int) -> None:
        """Remove a finished operation's journal, check-and-set on its modify index (> 0):
        `CasConflict` if it changed since; one already gone stays gone."""

    # -- sessions and locks, under ops_prefix -------------------------------------
    @abstractmethod
    async def create_session(self, name: str, ttl_seconds: float) -> str:
        """A new session (a lease): it ends when it is not renewed within `ttl_seconds`
        (the store may take up to twice that to notice), or is destroyed, and then every
        lock it holds is released at once (no lock delay) and may be taken by another."""

    @abstractmethod
    async def renew_session(self, session_id: str) -> bool:
        """Extend the session by its TTL; False when it is gone (expired or destroyed:
        its locks are lost, the holder must stop acting as their holder)."""

    @abstractmethod
    async def destroy_session(self, session_id: str) -> None:
        """End the session now, releasing its locks. Idempotent."""

    @abstractmethod
    async def acquire_lock(self, name: str, session_id: str, value: dict[str, Any]) -> bool:
        """Take the lock `name` for the session, writing `value` (who holds it): True
        when the session holds it now (taken, or held already: the value is replaced),
        False when another session holds it. `SessionGone` if the session is gone."""

    async def acquire_lock_sequenced(self, name: str, session_id: str,
                                     value: dict[str, Any]) -> int:
        """`acquire_lock`, answering this acquisition's sequencer instead of True: a
        number > 0, larger than that of every earlier acquisition of the lock (Consul:
        the key's ModifyIndex as written, a raft index, so it grows even across a
        delete and re-creation of the key); 0 when another session holds it. A store
        that has no such number answers 1 (this default): its sequencers fence nothing."""
        return 1 if await self.acquire_lock(name, session_id, value) else 0

    @abstractmethod
    async def release_lock(self, name: str, session_id: str) -> bool:
        """Release the lock if the session holds it (its value stays, for the record);
        False when it did not hold it."""

    @abstractmethod
    async def lock_holder(self, name: str) -> LockState:
        """Who holds the lock now (`LockState`; a lock never taken is all None)."""

    @abstractmethod
    async def watch_lock(self, name: str, index: int, wait_seconds: float = 30.0) -> LockState:
        """A blocking `lock_holder`: returns once the lock changed after `index` (0: at
        once), or when the wait is over (then possibly unchanged). Blocking-query rules
        apply to the returned index, as for `watch` (region_map/follower.py)."""

    # -- service registry --------------------------------------------------------
    @abstractmethod
    async def register_service(
        self, service: str, instance_id: str, address: str, port: int, tags: list[str],
        health_url: str | None, url: str = "", meta: Mapping[str, str] | None = None,
    ) -> None:
        """Register an instance with an HTTP health check on `health_url` (None: no check,
        for an entry that only says where something is); `url`, if given, is the base URL
        the instance serves under (see `ServiceInstance.url`); `meta`, more of the same
        (`ServiceInstance.meta`)."""

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
