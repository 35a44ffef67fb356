"""`MapWatcher`: the whole map in memory, kept fresh with blocking queries.

One background task asks the store for the map again and again, each time
blocking until something changed after the last index it saw (the loop is
`BlockingFollower`'s). Everyone else reads `current`, which never blocks.
While the store is unreachable the watcher keeps the last map (gateways keep
serving), logs, retries with a capped back-off, and catches up as soon as the
store answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from region_map.follower import BlockingFollower
from region_map.model import RegionMap
from region_map.store import MapStore

log = logging.getLogger("boxoffice.region_map")

Listener = Callable[[RegionMap], None]


class MapWatcher(BlockingFollower[RegionMap]):
    def __init__(self, store: MapStore, **follow: float) -> None:
        """`follow`: `BlockingFollower`'s wait_seconds, min_backoff, max_backoff."""
        super().__init__(store, **follow)
        self._current: RegionMap | None = None
        self._healthy: bool | None = None  # None: not asked yet
        self._listeners: list[Listener] = []
        self._changed = asyncio.Condition()

    @property
    def current(self) -> RegionMap | None:
        """The latest complete map seen (None until the first load)."""
        return self._current

    @property
    def healthy(self) -> bool:
        """Whether the last query to the store succeeded."""
        return bool(self._healthy)

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(new_map)` after every change (in the watch task: keep it quick).
        Returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def start(self, first_load_timeout: float = 5.0) -> None:
        """Start watching; waits (bounded) for the first map, but starts even without it."""
        self._start_task("region-map-watch")
        with contextlib.suppress(TimeoutError):
            await self.wait_for(lambda _: True, first_load_timeout)

    async def wait_for(self, predicate: Callable[[RegionMap], bool], timeout: float) -> RegionMap:
        """The first map in memory that satisfies `predicate` (woken by each change, no
        polling); `TimeoutError` after `timeout` seconds."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self._current is not None and predicate(self._current))
            assert self._current is not None
            return self._current

    async def wait_for_health(self, healthy: bool, timeout: float) -> None:
        """Wait until the store is (un)reachable as far as the watcher knows."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self._healthy is healthy)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _publish(self, new_map: RegionMap) -> None:
        self._current = new_map
        for listener in list(self._listeners):
            try:
                listener(new_map)
            except Exception:
                log.exception("region map listener failed")
        await self._notify()

    async def _set_healthy(self, healthy: bool, error: BaseException | None = None) -> None:
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            log.info("region map store reachable")
        else:
            log.warning("region map store unreachable; serving the last map: %s", error)
        await self._notify()

    async def _query(self, index: int) -> tuple[int, RegionMap]:
        new_map = await self.store.watch(index, self.wait_seconds)
        return new_map.index, new_map

    async def _deliver(self, new_map: RegionMap) -> bool:
        await self._set_healthy(True)
        if self._current is not None and new_map == self._current:
            return False
        await self._publish(new_map)
        return True

    async def _failed(self, error: BaseException) -> None:
        await self._set_healthy(False, error)
