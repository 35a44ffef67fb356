"""Exactly one active failover controller: a Consul session lock, held in terms.

Every controller process contends for one lock (`CONTROLLER_LOCK`, under the ops prefix:
`boxoffice-ops/locks/controller`) with a session of its own: a short TTL (1 s by
default), no lock delay, renewed every TTL/4. The rules:

- A holder is active only while its last successful renewal was sent less than one TTL
  ago. Consul ends a session about twice its TTL after the last renewal it saw, so a
  holder that stops acting at one TTL leaves at least one TTL before anyone else can
  take the lock (it fences itself, as Patroni's leader demotes itself when it cannot
  update its key in time). Each renewal waits at most for what is left of that budget.
- A renewal answered "session gone" (expired, destroyed) ends the term at once.
- The term's work runs as a task that is cancelled the moment the term ends: a
  controller that loses its session stops acting at once. The end of a term is waited
  for at most `STOP_WAIT` seconds (a task that swallowed its cancel is logged and left
  behind, never awaited for ever), and a cancel aimed at the controller itself is never
  swallowed on the way. Work it leaves half-done is
  journalled (`failover.promote`), and the next holder finishes it.
- A contender watches the lock with blocking queries and tries to take it as soon as
  it is free; it never acts while it does not hold it.
- Consul unreachable: the holder's term ends when its renewal budget runs out, and
  contenders keep waiting. Nothing is decided without Consul.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from region_map import MapError, MapStore, SessionGone

log = logging.getLogger("boxoffice.failover.controller")

CONTROLLER_LOCK = "controller"
LOCK_TTL = 1.0  # seconds; Consul must allow it (session_ttl_min, deploy/consul_agent.py)
WATCH_WAIT = 5.0  # seconds a contender's blocking query on the lock waits at most
RETRY_BACKOFF = (0.1, 1.0)  # after Consul failed: first and largest pause
STOP_WAIT = 5.0  # seconds an ended term's tasks are waited for after their cancel, at most


@dataclass
class Term:
    """One uninterrupted holding of the lock."""

    session: str
    started_at: float  # time.time()
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str = ""


Work = Callable[[Term], Awaitable[None]]


class Leadership:
    """Contend for the lock forever; run `work(term)` while holding it (`run`)."""

    def __init__(self, store: MapStore, owner: dict[str, Any], *, ttl: float = LOCK_TTL,
                 lock: str = CONTROLLER_LOCK, watch_wait: float = WATCH_WAIT) -> None:
        self.store = store
        self.owner = owner  # the lock's value: who holds it (region, pid, status URL)
        self.ttl = ttl
        self.lock = lock
        self.watch_wait = watch_wait
        self.term: Term | None = None
        self.holder: dict[str, Any] | None = None  # the lock's value as last seen
        self.consul_reachable = True
        self.on_change: Callable[[], None] = lambda: None

    @property
    def active(self) -> bool:
        return self.term is not None and not self.term.ended.is_set()

    async def run(self, work: Work) -> None:
        backoff = RETRY_BACKOFF[0]
        index = 0
        while True:
            sent = time.monotonic()  # the session's TTL runs from its creation
            try:
                session = await self.store.create_session(f"{self.lock} {self.owner.get('region')}",
                                                          self.ttl)
                taken = await self.store.acquire_lock(self.lock, session, self.owner)
            except MapError as exc:
                self._reachable(False, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_BACKOFF[1])
                continue
            self._reachable(True)
            backoff = RETRY_BACKOFF[0]
            if taken:
                await self._hold(Term(session, time.time()), sent, work)
                index = 0
                continue
            await self._forget(session)  # a contender needs no session until the lock is free
            index = await self._wait_free(index)

    async def _wait_free(self, index: int) -> int:
        """Block until the lock is free (or the wait is over); the index to wait on next."""
        try:
            state = await self.store.watch_lock(self.lock, index, self.watch_wait)
        except MapError as exc:
            self._reachable(False, exc)
            await asyncio.sleep(RETRY_BACKOFF[1])
            return 0
        self._reachable(True)
        if state.value != self.holder:
            self.holder = state.value
            if state.session is not None:
                log.info("controller standby", extra={"holder": state.value})
            self.on_change()
        return state.watch_index if state.session is not None else 0  # free: try to take it now

    async def _hold(self, term: Term, sent: float, work: Work) -> None:
        self.term, self.holder = term, dict(self.owner)
        log.warning("controller active: holding the lock", extra={"lock": self.lock, "ttl": self.ttl})
        self.on_change()
        task = asyncio.create_task(work(term), name="controller-term")
        renewer = asyncio.create_task(self._renew(term, sent), name="controller-renew")
        try:
            await asyncio.wait([task, renewer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("controller term's work failed", exc_info=task.exception())
                term.end_reason = term.end_reason or f"work failed: {task.exception()!r}"
            term.end_reason = term.end_reason or "stopped"
            term.ended.set()  # before anything else: the work stops now
            for t in (task, renewer):
                t.cancel()
            try:
                # Waited for at most STOP_WAIT, with asyncio.wait: it neither raises their
                # CancelledError here nor swallows one aimed at this task (a bare `await t`
                # under suppress(CancelledError) did both, and waited for ever for work
                # that had swallowed its cancel).
                left = [t for t in (task, renewer) if not t.done()]
                if left:
                    await asyncio.wait(left, timeout=STOP_WAIT)
                for t in (task, renewer):
                    if not t.done():
                        log.error("controller term's task did not stop when cancelled; left "
                                  "behind", extra={"task": t.get_name()})
                    elif not t.cancelled():
                        t.exception()  # retrieved: logged above when it is the work's
            finally:
                log.warning("controller no longer active", extra={"reason": term.end_reason})
                self.term = None
                self.on_change()
                await self._forget(term.session)

    async def _renew(self, term: Term, last_ok: float) -> None:
        """Renew every TTL/4; end the term when the session is gone or the last renewal
        sent that Consul confirmed is one TTL old."""
        interval = self.ttl / 4
        while True:
            remaining = last_ok + self.ttl - time.monotonic()
            await asyncio.sleep(max(0.0, min(interval, remaining)))
            remaining = last_ok + self.ttl - time.monotonic()
            if remaining <= 0:
                term.end_reason = "lock not renewed within its TTL (Consul unreachable?)"
                self._reachable(False, None)
                return
            sent = time.monotonic()
            try:
                async with asyncio.timeout(remaining):
                    alive = await self.store.renew_session(term.session)
            except (TimeoutError, MapError, SessionGone) as exc:
                self._reachable(False, exc)
                continue  # the budget decides
            self._reachable(True)
            if not alive:
                term.end_reason = "session gone"
                return
            last_ok = sent

    async def _forget(self, session: str) -> None:
        """Destroy a session we no longer use (frees the lock at once); best effort: an
        unreachable Consul lets it expire by itself."""
        with contextlib.suppress(MapError, TimeoutError):
            async with asyncio.timeout(self.ttl):
                await self.store.destroy_session(session)

    def _reachable(self, reachable: bool, error: BaseException | None = None) -> None:
        if reachable != self.consul_reachable:
            self.consul_reachable = reachable
            if reachable:
                log.info("consul reachable again")
            else:
                log.warning("consul unreachable: the controller does nothing", extra={"error": repr(error)})
            self.on_change()
