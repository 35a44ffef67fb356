"""A lease on one shard's operations: a Consul session lock, renewed while held.

Promotion (and, later, switchover and moves) take `shard-op-<shard>` before touching a
shard, so two runners (an operator's command, a gateway's admin call, the controller)
never work on one shard at once. The session has a short TTL and no lock delay: a runner
that dies frees the shard within about twice the TTL, and the next runner resumes the
journal it left. A runner whose renewal fails has lost the lease (`lost`) and must not
pass its commit point.

The lease also fences the data, not only the journal: `sequencer` is the number Consul
gave this acquisition of the lock (the key's ModifyIndex, a raft index: every later
acquisition, by anyone, gets a larger one). A runner sends it with every step that
changes a server or a shard's rows (`X-Boxoffice-Sequencer: <lock>:<n>`, common/sequencer.py); the booking
service and the node agent keep the newest they have seen per lock and refuse an older
one (docs/moves.md, docs/failover.md). So a runner paused past its lease, whose lock was
taken since by another runner, can change nothing when it wakes up, even between its
last confirmation and its next step.

Releasing ends within a bound, whatever happens to a cancellation: the renewer stops on
a flag it checks before every renewal (not only on being cancelled: Python 3.11's
`asyncio.wait_for` can swallow a cancel that meets a finished call, and a renewer that
survived its cancel would keep the shard locked for as long as the process lives), each
renewal is bounded by the TTL, and `release` waits for the renewer at most one TTL before
destroying the session, which frees the lock whatever the renewer does. Shown by
tests/test_controller_bounds.py `test_a_lease_is_released_even_when_its_renewer_swallows_its_cancel`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

from common.sequencer import format_fence
from region_map import MapError, MapStore, SessionGone
from region_map.model import check_name

log = logging.getLogger("boxoffice.failover")

# Seconds. Consul refuses TTLs under its `session_ttl_min` (10 s by default; the local
# cluster's agent allows 1 s, deploy/consul_agent.py).
LEASE_TTL = 5.0


def shard_lock(shard: str) -> str:
    return f"shard-op-{check_name('shard', shard)}"


class LeaseHeld(Exception):
    def __init__(self, holder: str) -> None:
        super().__init__(f"held by {holder}")
        self.holder = holder


class Lease:
    def __init__(self, store: MapStore, name: str, session: str, ttl: float,
                 sequencer: int = 0) -> None:
        self.store = store
        self.name = name
        self.session = session
        self.ttl = ttl
        self.sequencer = sequencer  # this acquisition's number (0: the store gave none)
        self.lost = False
        self.released = False  # the renewer's stop flag (a cancel alone may be swallowed)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def take(cls, store: MapStore, name: str, owner: str, ttl: float | None = None) -> Lease:
        """Take the lock `name` now, or raise `LeaseHeld` (naming its holder)."""
        check_name("lock", name)
        ttl = ttl or LEASE_TTL
        session = await store.create_session(f"{name} {owner}", ttl)
        value = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid()}
        try:
            sequencer = await _acquire(store, name, session, value)
            if not sequencer:
                holder = await store.lock_holder(name)
                who = holder.value or {}
                raise LeaseHeld(f"{who.get('owner', '?')} (pid {who.get('pid', '?')} "
                                f"on {who.get('host', '?')})")
        except BaseException:
            with contextlib.suppress(MapError):
                await store.destroy_session(session)
            raise
        lease = cls(store, name, session, ttl, sequencer)
        lease._task = asyncio.create_task(lease._renew(), name=f"lease-{name}")
        return lease

    @property
    def fence(self) -> str:
        """The `X-Boxoffice-Sequencer` value of this lease's steps: `<lock>:<sequencer>`."""
        return format_fence(self.name, self.sequencer)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)  # renew well inside the TTL
            if self.released:  # stopped, even if a cancel was swallowed on the way
                return
            try:
                async with asyncio.timeout(self.ttl):
                    alive = await self.store.renew_session(self.session)
            except (MapError, SessionGone, TimeoutError):
                continue  # Consul unreachable: the session may outlive it; try again
            if not alive:
                self.lost = True
                log.warning("lease lost", extra={"lock": self.name})
                return

    async def confirm(self) -> bool:
        """Renew the session now: True while this runner still holds the lease. A runner
        calls it right before its commit point, so a lease lost since the last periodic
        renewal is seen there; a store that does not answer is a False (it cannot tell)."""
        if self.lost:
            return False
        try:
            alive = await self.store.renew_session(self.session)
        except (MapError, SessionGone):
            return False
        if not alive:
            self.lost = True
            log.warning("lease lost", extra={"lock": self.name})
        return alive

    async def release(self) -> None:
        """Stop renewing and destroy the session (which frees the lock); ends within about
        two TTLs plus one store call, even when the renewer ignores its cancel."""
        self.released = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            # asyncio.wait neither raises the renewer's CancelledError here nor swallows
            # one aimed at the caller; a renewer still running after a TTL stops at its
            # next check of `released`.
            await asyncio.wait([self._task], timeout=self.ttl)
            if not self._task.done():
                log.error("lease renewer did not stop when cancelled; it stops at its next "
                          "renewal", extra={"lock": self.name})
        try:
            async with asyncio.timeout(max(self.ttl, 1.0) + 5.0):
                await self.store.destroy_session(self.session)  # releases the lock
        except (MapError, TimeoutError) as exc:
            log.warning("lease not released; it expires with its session", extra={"error": repr(exc)})



async def _acquire(store: MapStore, name: str, session: str, value: dict[str, Any]) -> int:
    """The lock's sequencer for this acquisition (0: held by another). A duck-typed
    store without `acquire_lock_sequenced` (a test's fake) gives 1 when it takes it."""
    sequenced = getattr(store, "acquire_lock_sequenced", None)
    if sequenced is not None:
        return int(await sequenced(name, session, value))
    return 1 if await store.acquire_lock(name, session, value) else 0
