"""`BlockingFollower`: the blocking-query loop that `MapWatcher` and `HealthWatcher` share.

One background task asks the store again and again, each time blocking until
something changed after the last index it saw, and hands every answer to the
subclass (`_deliver`). A failing store is retried with a capped back-off (the
subclass keeps what it had: `_failed`); the task outlives any error.

Consul's blocking-query rules are applied here, once: an index that went
backwards means the store was reset, so the next query is a plain read (0);
an index below 1 is never waited on (every query would return at once); an
early answer with nothing new paces the loop rather than spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

from region_map.model import MapError
from region_map.store import MapStore

log = logging.getLogger("boxoffice.region_map")

T = TypeVar("T")


class BlockingFollower(ABC, Generic[T]):
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
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """Whether the follow task is alive."""
        return self._task is not None and not self._task.done()

    def _start_task(self, name: str) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @abstractmethod
    async def _query(self, index: int) -> tuple[int, T]:
        """One blocking read after `index`: (the index it returned, the answer)."""

    @abstractmethod
    async def _deliver(self, answer: T) -> bool:
        """Take an answer; True when it was news."""

    async def _failed(self, error: BaseException) -> None:
        """The store did not answer (the last answer is kept)."""

    async def _run(self) -> None:
        index = 0
        backoff = self.min_backoff
        while True:
            asked = index
            started = time.monotonic()
            try:
                returned, answer = await self._query(asked)
            except Exception as exc:  # the task must outlive any failure of the store
                if not isinstance(exc, MapError):
                    log.exception("%s: a blocking query failed unexpectedly", type(self).__name__)
                await self._failed(exc)
                await asyncio.sleep(backoff)  # retry back-off, capped so recovery is quick
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = self.min_backoff
            index = 0 if returned < asked else max(returned, 1)
            news = await self._deliver(answer)
            if not news and time.monotonic() - started < self.min_backoff:
                await asyncio.sleep(self.min_backoff)  # an early answer, nothing new: pace
