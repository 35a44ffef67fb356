"""`MapWatcher`: the whole map in memory, kept fresh with blocking queries.

While the store is unreachable it keeps the last map it saw (gateways keep
serving), retries with a capped back-off, and catches up as soon as the store
answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from region_map.model import MapError, RegionMap
from region_map.store import MapStore

log = logging.getLogger("boxoffice.region_map")

Listener = Callable[[RegionMap], None]


class MapWatcher:
    def __init__(
        self, store: MapStore, *, wait_seconds: float = 30.0, max_backoff: float = 1.0
    ) -> None:
        self.store = store
        self.wait_seconds = wait_seconds
        self.max_backoff = max_backoff
        self.current: RegionMap | None = None
        self.healthy = False
        self.listeners: list[Listener] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def start(self, first_load_timeout: float = 5.0) -> None:
        """Start watching; waits (bounded) for the first map, but starts even without it."""
        self._task = asyncio.create_task(self._run(), name="region-map-watch")
        with contextlib.suppress(TimeoutError):
            await self.wait_for(lambda _: True, first_load_timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_for(self, predicate: Callable[[RegionMap], bool], timeout: float) -> RegionMap:
        """Wait until the map in memory satisfies `predicate` (event-driven, no polling)."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(
                    lambda: self.current is not None and predicate(self.current)
                )
                assert self.current is not None
                return self.current

    async def _publish(self, new_map: RegionMap) -> None:
        self.current = new_map
        for listener in self.listeners:
            try:
                listener(new_map)
            except Exception:
                log.exception("region map listener failed")
        async with self._changed:
            self._changed.notify_all()

    async def _run(self) -> None:
        index = 0
        backoff = 0.05
        while True:
            try:
                new_map = await self.store.watch(index, self.wait_seconds)
            except MapError as exc:
                if self.healthy or backoff >= self.max_backoff:
                    log.warning("region map store unreachable; serving the last map",
                                extra={"error": str(exc)})
                self.healthy = False
                await asyncio.sleep(backoff)  # retry back-off
                backoff = min(backoff * 2, self.max_backoff)
                continue
            if not self.healthy:
                log.info("region map store reachable", extra={"index": new_map.index})
            self.healthy = True
            backoff = 0.05
            # Consul's rule: an index that goes backwards means a reset; start over.
            if new_map.index < index:
                index = 0
            if self.current is None or new_map.index != index or new_map != self.current:
                await self._publish(new_map)
            index = max(new_map.index, 1)
