"""A lease on one shard's operations: a Consul session lock, renewed while held.

Promotion (and, later, switchover and moves) take `shard-op-<shard>` before touching a
shard, so two runners (an operator's command, a gateway's admin call, the controller)
never work on one shard at once. The session has a short TTL and no lock delay: a runner
that dies frees the shard within about twice the TTL, and the next runner resumes the
journal it left. A runner whose renewal fails has lost the lease (`lost`) and must not
pass its commit point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

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
    def __init__(self, store: MapStore, name: str, session: str, ttl: float) -> None:
        self.store = store
        self.name = name
        self.session = session
        self.ttl = ttl
        self.lost = False
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def take(cls, store: MapStore, name: str, owner: str, ttl: float | None = None) -> Lease:
        """Take the lock `name` now, or raise `LeaseHeld` (naming its holder)."""
        check_name("lock", name)
        ttl = ttl or LEASE_TTL
        session = await store.create_session(f"{name} {owner}", ttl)
        value = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid()}
        try:
            if not await store.acquire_lock(name, session, value):
                holder = await store.lock_holder(name)
                who = holder.value or {}
                raise LeaseHeld(f"{who.get('owner', '?')} (pid {who.get('pid', '?')} "
                                f"on {who.get('host', '?')})")
        except BaseException:
            with contextlib.suppress(MapError):
                await store.destroy_session(session)
            raise
        lease = cls(store, name, session, ttl)
        lease._task = asyncio.create_task(lease._renew(), name=f"lease-{name}")
        return lease

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)  # renew well inside the TTL
            try:
                alive = await self.store.renew_session(self.session)
            except (MapError, SessionGone):
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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.store.destroy_session(self.session)  # releases the lock
        except MapError as exc:
            log.warning("lease not released; it expires with its session", extra={"error": str(exc)})
