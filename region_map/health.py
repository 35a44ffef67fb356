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

from region_map.follower import BlockingFollower
from region_map.store import MapStore, ServiceInstance

log = logging.getLogger("boxoffice.region_map")


def passing_by_url(instances: list[ServiceInstance]) -> dict[str, bool]:
    """{registered URL: all checks passing}, for the instances that registered a URL."""
    return {i.url: i.passing for i in instances if i.url}


class HealthWatcher(BlockingFollower[list[ServiceInstance]]):
    def __init__(self, store: MapStore, service: str, **follow: float) -> None:
        """`follow`: `BlockingFollower`'s wait_seconds, min_backoff, max_backoff."""
        super().__init__(store, **follow)
        self.service = service
        self._passing: dict[str, bool] = {}  # instance URL -> all checks passing
        self._instances: list[ServiceInstance] = []
        self._loaded = asyncio.Event()
        self._changed = asyncio.Condition()

    @property
    def instances(self) -> list[ServiceInstance]:
        """The latest view: every registered instance with its `passing` state."""
        return list(self._instances)

    def failing(self, url: str) -> bool:
        """Whether an instance registered under `url` (exactly) fails its checks."""
        return self._passing.get(url) is False

    async def start(self, first_load_timeout: float = 2.0) -> None:
        """Start watching; waits (bounded) for a first view, but starts without one."""
        self._start_task(f"health-watch-{self.service}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(first_load_timeout):
                await self._loaded.wait()

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

    async def _query(self, index: int) -> tuple[int, list[ServiceInstance]]:
        return await self.store.watch_instances(self.service, index, self.wait_seconds)

    async def _deliver(self, instances: list[ServiceInstance]) -> bool:
        if self._loaded.is_set() and instances == self._instances:
            return False
        passing = passing_by_url(instances)
        for url, now in passing.items():
            if self._passing.get(url, True) != now:
                log.warning("%s %s health checks %s", self.service, url,
                            "pass again" if now else "fail")
        self._instances = instances
        self._passing = passing
        self._loaded.set()
        async with self._changed:
            self._changed.notify_all()
        return True
