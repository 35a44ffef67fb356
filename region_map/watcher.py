"""`MapWatcher`: the whole map in memory, kept fresh with blocking queries.

One background task asks the store for the map again and again, each time
blocking until something changed after the last index it saw. Everyone else
reads `current`, which never blocks. While the store is unreachable the
watcher keeps the last map (gateways keep serving), logs, retries with a
capped back-off, and catches up as soon as the store answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from region_map.model import MapError, RegionMap
from region_map.store import MapStore

log = logging.getLogger("boxoffice.region_map")

Listener = Callable[[RegionMap], None]


class MapWatcher:
    def __init__(
        self,
        store: MapStore,
        *,
        wait_seconds: float = 30.0,
        min_backoff: float = 0.05,
        max_backoff: float = 1.0,
    ) -> None:
        self.store = store
        self.wait_seconds = wait_seconds
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._current: RegionMap | None = None
        self._healthy: bool | None = None  # None: not asked yet
        self._listeners: list[Listener] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    @property
    def current(self) -> RegionMap | None:
        """The latest complete map seen (None until the first load)."""
        return self._current

    @property
    def healthy(self) -> bool:
        """Whether the last query to the store succeeded."""
        return bool(self._healthy)

    @property
    def running(self) -> bool:
        """Whether the watch task is alive."""
        return self._task is not None and not self._task.done()

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(new_map)` after every change (in the watch task: keep it quick).
        Returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def start(self, first_load_timeout: float = 5.0) -> None:
        """Start watching; waits (bounded) for the first map, but starts even without it."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="region-map-watch")
        with contextlib.suppress(TimeoutError):
            await self.wait_for(lambda _: True, first_load_timeout)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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

    async def _run(self) -> None:
        index = 0
        backoff = self.min_backoff
        while True:
            asked = index
            started = time.monotonic()
            try:
                new_map = await self.store.watch(asked, self.wait_seconds)
            except Exception as exc:  # the task must outlive any failure of the store
                if not isinstance(exc, MapError):
                    log.exception("region map watch failed unexpectedly")
                await self._set_healthy(False, exc)
                await asyncio.sleep(backoff)  # retry back-off, capped so recovery is quick
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = self.min_backoff
            await self._set_healthy(True)
            # Consul's blocking-query rules: an index that went backwards means the
            # store was reset, so start over with a plain read; never block on an
            # index below 1, or every query returns at once.
            index = 0 if new_map.index < asked else max(new_map.index, 1)
            changed = self._current is None or new_map != self._current
            if changed:
                await self._publish(new_map)
            elif time.monotonic() - started < self.min_backoff:
                # An early answer with nothing new: pace the loop rather than spin.
                await asyncio.sleep(self.min_backoff)
