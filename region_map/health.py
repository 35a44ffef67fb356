"""`HealthWatcher`: which instances of a service Consul's health checks say are failing.

One background task follows the registry with blocking queries (it wakes at
every change of health) and keeps the latest view in memory; `failing(url)`
never blocks. A booking service registers one instance per shard copy it
serves, under that copy's URL, with a check on the copy's `/api/ready` (its
database answers, in the role the map gives it). The gateway tries a shard's
copies whose checks pass before one whose checks fail, as vtgate prefers the
tablets its health check reports serving; its circuit breakers still catch
what the checks have not seen yet.

Only a *registered* instance whose checks fail counts as failing: a URL the
registry does not know is not held against anyone. While Consul is
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
        self._passing: dict[str, bool] = {}  # instance URL -> all checks passing
        self._instances: list[ServiceInstance] = []
        self._loaded = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    @property
    def instances(self) -> list[ServiceInstance]:
        """The latest view: every registered instance with its `passing` state."""
        return list(self._instances)

    def failing(self, url: str) -> bool:
        """Whether an instance registered under `url` fails its checks."""
        return self._passing.get(url.rstrip("/")) is False

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

    async def wait_until(self, url: str, *, failing: bool, timeout: float) -> None:
        """Wait until the instance registered under `url` is (not) failing."""
        await self.wait_for(lambda _: self.failing(url) is failing, timeout)

    async def _publish(self, instances: list[ServiceInstance]) -> None:
        passing = {i.url.rstrip("/"): i.passing for i in instances if i.url}
        for url, now in passing.items():
            if self._passing.get(url, True) != now:
                log.warning("%s %s health checks %s", self.service, url,
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
