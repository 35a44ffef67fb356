"""`HealthWatcher`: which instances of a service Consul's health checks say are failing.

One background task follows the registry with blocking queries (it wakes at
every change of health) and keeps the latest view in memory; `failing(host,
port)` never blocks. The gateway uses it to try a shard's copies whose booking
service passes its checks before one whose checks fail, as vtgate prefers the
tablets its health check reports serving; its circuit breakers still catch
what the checks have not seen yet.

Only a *registered* instance whose checks fail counts as failing: an address
the registry does not know is not held against anyone. While Consul is
unreachable the last view is kept (and is only a preference: a copy marked
failing is still tried, last).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from region_map.model import MapError
from region_map.store import MapStore, ServiceInstance

log = logging.getLogger("boxoffice.region_map")


class HealthWatcher:
    def __init__(
        self,
        store: MapStore,
        service: str,
        *,
        wait_seconds: float = 30.0,
        min_backoff: float = 0.05,
        max_backoff: float = 1.0,
    ) -> None:
        self.store = store
        self.service = service
        self.wait_seconds = wait_seconds
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._passing: dict[tuple[str, int], bool] = {}
        self._instances: list[ServiceInstance] = []
        self._loaded = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    @property
    def instances(self) -> list[ServiceInstance]:
        """The latest view: every registered instance with its `passing` state."""
        return list(self._instances)

    def failing(self, host: str, port: int) -> bool:
        """Whether the instance at host:port is registered and its checks fail."""
        return self._passing.get((host, port)) is False

    async def start(self, first_load_timeout: float = 2.0) -> None:
        """Start watching; waits (bounded) for a first view, but starts without one."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"health-watch-{self.service}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(first_load_timeout):
                await self._loaded.wait()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_for(
        self, predicate: Callable[[list[ServiceInstance]], bool], timeout: float
    ) -> list[ServiceInstance]:
        """The first view whose instances satisfy `predicate` (woken by each new view, no
        polling); `TimeoutError` after `timeout` seconds."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self._instances))
            return list(self._instances)

    async def wait_until(self, host: str, port: int, *, failing: bool, timeout: float) -> None:
        """Wait until host:port is (not) failing."""
        await self.wait_for(lambda _: self.failing(host, port) is failing, timeout)

    async def _publish(self, instances: list[ServiceInstance]) -> None:
        passing = {(i.address, i.port): i.passing for i in instances}
        for key, now in passing.items():
            if self._passing.get(key, True) != now:
                log.warning("%s %s:%d health checks %s", self.service, key[0], key[1],
                            "pass again" if now else "fail")
        self._instances = instances
        self._passing = passing
        self._loaded.set()
        async with self._changed:
            self._changed.notify_all()

    async def _run(self) -> None:
        index = 0
        backoff = self.min_backoff
        while True:
            asked = index
            try:
                index, instances = await self.store.watch_instances(
                    self.service, asked, self.wait_seconds)
            except Exception as exc:  # the task must outlive any failure of the store
                if not isinstance(exc, MapError):
                    log.exception("health watch failed unexpectedly")
                await asyncio.sleep(backoff)  # keep the last view; retry, capped back-off
                backoff = min(backoff * 2, self.max_backoff)
                index = 0
                continue
            backoff = self.min_backoff
            # Consul's blocking-query rules: an index that went backwards means the
            # registry was reset (start over with a plain read); never block on 0.
            index = 0 if index < asked else max(index, 1)
            await self._publish(instances)
            if index == asked:  # a wait that ended with nothing new: pace the loop
                await asyncio.sleep(self.min_backoff)
