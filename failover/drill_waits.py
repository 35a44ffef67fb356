"""The waits of a failover drill, each ending on a definite condition, and what a fault
should lead to (failover/drill.py runs them; see its docstring, steps 3 and 4).

Rules:
- Every wait ends by itself: its condition, a named reason it will not come, or its
  deadline; loops watch a deadline and an `over` event, never only cancellation
  (Python 3.11's wait_for can swallow a cancel that meets a finished call, and a loop
  relying on it would run for ever).
- A wait that gives up says why, with each copy as its node agent reports it and what
  the active controller last said about the shard.
- What a fault should lead to is decided from the map before it
  (`no_failover_expected`): the promotion primitive's own rules (failover/promote.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from failover.agents import AgentError, CopyStatus, NodeAgents
from failover.drill_cluster import DrillCluster, DrillError
from failover.drill_load import Load
from failover.drill_report import parse_wall
from failover.leadership import CONTROLLER_LOCK
from failover.promote import promote
from region_map import ConsulMapStore, MapError, Shard

if TYPE_CHECKING:
    from failover.drill import DrillSettings

NO_CONTROLLER_SECONDS = 10.0  # no controller holding the lock this long: nothing will promote
CONTROLLER_WAIT = 15.0  # before the fault: for a controller to hold the lock (a resumed one retakes it)
JUDGE_EVERY = 0.5  # seconds between checks that no promotion is coming


@dataclass
class Change:
    """How the wait for a new primary ended: `shard` as the map has it, its modify index,
    when it was seen; `why` set when there was no change of primary (the platform
    survived the fault another way, from `at` on)."""

    shard: Shard
    index: int
    at: float
    why: str = ""


class Waits:
    """The drill's waits and probes (a base of failover.drill._Drill, which sets these)."""

    c: DrillCluster
    s: DrillSettings
    say: Callable[[str], None]
    store: ConsulMapStore
    agents: NodeAgents
    http: aiohttp.ClientSession

    async def controller_holds_lock(self) -> bool | None:
        """Whether some failover controller holds the lock now (None: Consul did not answer)."""
        try:
            return (await self.store.lock_holder(CONTROLLER_LOCK)).session is not None
        except MapError:
            return None

    async def wait_for_controller(self, shard: str) -> None:
        """Until a controller holds the lock and none has an operation on `shard` in
        flight (one left from before the drill would not be this fault's failover)."""
        deadline = time.monotonic() + CONTROLLER_WAIT
        while not await self.controller_holds_lock():
            if time.monotonic() > deadline:
                raise DrillError(
                    f"no failover controller has held the lock for {CONTROLLER_WAIT:.0f}s: an automatic "
                    "drill would wait for a promotion nobody makes (start the controllers, or run the "
                    "drill with --manual)")
            await asyncio.sleep(0.2)  # poll interval
        deadline = time.monotonic() + self.s.timeout
        while busy := [name for name, doc in (await self.controller_status()).items()
                       if shard in (doc.get("inProgress") or [])]:
            if time.monotonic() > deadline:
                raise DrillError(f"{', '.join(busy)} has had an operation on {shard} in flight for "
                                 f"{self.s.timeout:.0f}s before the fault: the drill would not measure "
                                 "its own failover (is that controller stuck?)")
            await asyncio.sleep(0.5)  # poll interval

    async def controller_status(self) -> dict[str, dict[str, Any]]:
        """Each controller's /status that answers (none known from a gateway)."""
        docs = {}
        for region, url in self.c.controllers.items():
            try:
                async with self.http.get(f"{url}/status", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    docs[f"controller[{region}]"] = dict(await resp.json(content_type=None))
            except (aiohttp.ClientError, TimeoutError, ValueError, TypeError):
                continue
        return docs

    async def controllers_say(self, shard: str) -> str:
        """What the controllers last said about `shard`, for an error message."""
        said = []
        for name, doc in (await self.controller_status()).items():
            if doc.get("active"):
                last = next((r for r in reversed(doc.get("history") or []) if r.get("shard") == shard), None)
                said.append(f"{name} (active): " + (f"last {last.get('outcome')}: {last.get('detail')}"
                                                     if last else "nothing about it")
                            + (", one in flight" if shard in (doc.get("inProgress") or []) else ""))
        return "; ".join(said) or "no controller status"

    async def copies_now(self, name: str) -> str:
        """Each copy of a shard as its node agent reports it now, for an error message:
        `map primary west/b epoch 2: east standby tl 2 streaming at 0/4000060; west no
        answer; west/b primary tl 2 epoch 2 at 0/4000060`."""
        try:
            shard, _ = await self.store.read_shard(name)
        except MapError as exc:
            return f"the map does not answer ({exc})"
        parts = []
        for key in shard.members:
            try:
                c = await self.agents.copy_status(key, name)
            except AgentError:
                parts.append(f"{key} no answer")
                continue
            parts.append(" ".join(str(x) for x in (
                key, c.role or "not running", f"tl {c.timeline}",
                f"epoch {c.epoch}" if c.role == "primary" else
                ("streaming" if c.streaming else "NOT streaming"),
                f"at {c.position_lsn}")))
        return f"map primary {shard.primary_copy} epoch {shard.epoch}: " + "; ".join(parts)


    # -- waiting for the new primary, on definite conditions -------------------------------
    async def moved_on(self, before: Shard, load: Load,
                       switch: asyncio.Task[Any] | None) -> Change:
        """Until the map names another primary, or something says it never will (see
        the module docstring, step 4). Both watchers end by themselves (their deadline,
        or `over`), never only by cancellation: Python 3.11's wait_for can swallow a
        cancel that meets a finished call, and a loop relying on it would run on."""
        until, over = time.monotonic() + self.s.timeout, asyncio.Event()
        watch = asyncio.create_task(self._map_change(before, until, over))
        judge = asyncio.create_task(self._no_change_coming(before, load, switch, until, over))
        try:
            await asyncio.wait({watch, judge}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            over.set()
            await asyncio.gather(watch, judge, return_exceptions=True)
        if (change := watch.result()) is not None:
            return change
        if (change := judge.result()) is not None:  # raises DrillError when recovery will not come
            return change
        raise DrillError(f"{before.name}: no new primary {self.s.timeout:.0f}s after the fault; "
                         f"copies now: {await self.copies_now(before.name)}; controllers: "
                         f"{await self.controllers_say(before.name)}")

    async def outage(self, before: Shard, why: str) -> Change:
        """A fault no rule lets the platform fail over from by itself: the host stays
        down `outage_seconds`, the map must not change meanwhile (a change ends it)."""
        change = await self._map_change(before, time.monotonic() + self.s.outage_seconds, asyncio.Event())
        return change or Change(before, 0, time.monotonic(), why=(
            f"{why}; the map did not change during the {self.s.outage_seconds:g}s outage and "
            "writes came back with the host"))

    async def _map_change(self, before: Shard, until: float, over: asyncio.Event) -> Change | None:
        """The map's change of primary, or None at `until` or once `over` is set."""
        while time.monotonic() < until and not over.is_set():
            with contextlib.suppress(MapError):
                shard, index = await self.store.read_shard(before.name)
                if shard.epoch > before.epoch:
                    return Change(shard, index, time.monotonic())
            await asyncio.sleep(0.01)  # poll interval (the promotion's time is measured by it)
        return None

    async def _no_change_coming(self, before: Shard, load: Load, switch: asyncio.Task[Any] | None,
                                until: float, over: asyncio.Event) -> Change | None:
        """Returns a Change (or raises DrillError) once no promotion will come; None at
        `until` or once `over` is set."""
        no_controller_since: float | None = None
        back_since: float | None = None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(over.wait(), JUDGE_EVERY)
            if over.is_set() or time.monotonic() >= until:
                return None
            try:
                shard, index = await self.store.read_shard(before.name)
            except MapError:
                continue  # no evidence either way
            if shard.epoch > before.epoch:
                continue  # the watch sees it too, and wins
            if switch is not None:
                if switch.done():
                    await asyncio.sleep(JUDGE_EVERY)  # the watch's turn, had the map changed
                    error = switch.exception()
                    raise DrillError(f"{before.name}: the switchover ended without a new primary: "
                                     f"{error or 'it reported success but the map did not change'}")
                continue
            try:
                old = await self.agents.copy_status(before.primary_copy, before.name)
                back = (old.running and old.role == "primary" and shard.primary_copy == before.primary_copy
                        and old.epoch == shard.epoch)
                host_down = False
            except AgentError:
                back, host_down = False, True
            if not back:
                back_since = None
                if self.s.manual or not host_down:  # a host that answers may be coming back
                    no_controller_since = None
                    continue
                held = await self.controller_holds_lock()
                if held is False:
                    no_controller_since = no_controller_since or time.monotonic()
                    if time.monotonic() - no_controller_since >= self.s.no_controller_seconds:
                        raise DrillError(
                            f"{before.name}: no failover controller has held the lock for "
                            f"{self.s.no_controller_seconds:.0f}s after the fault (stopped or paused) and "
                            f"{before.primary_copy} does not answer: nothing will promote; copies now: "
                            f"{await self.copies_now(before.name)}")
                elif held:
                    no_controller_since = None
                continue
            back_since = back_since or time.monotonic()
            if load.confirmed_after(before.name, back_since):
                return Change(shard, index, back_since, why=(
                    f"the old primary {before.primary_copy} came back (started by something other "
                    "than the drill) and took bookings again before any promotion: the map never "
                    "changed, so no promotion will come"))

    async def controller_record(self, shard: str, fault_wall: float) -> dict[str, Any] | None:
        """The controllers' record of the promotion they made after the fault."""
        found = None
        for url in self.c.controllers.values():
            try:
                async with self.http.get(f"{url}/status", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    doc = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
            for record in doc.get("history") or []:
                detected = parse_wall(record.get("detectedAt"))
                if record.get("shard") == shard and record.get("outcome") in ("promoted", "finished") \
                        and detected is not None and detected >= fault_wall - 1:
                    found = record
        return found

    # -- manual recovery --------------------------------------------------------------------
    async def manual_failover(self, before: Shard) -> tuple[float, dict[str, Any]]:
        """Detect the dead primary by probing its node agent, then promote the running
        standby of the synchronous set with the highest (timeline, position)."""
        deadline = time.monotonic() + self.s.timeout
        while True:
            try:
                status = await self.agents.copy_status(before.primary_copy, before.name)
                down = not (status.running and status.role == "primary")
            except AgentError:
                down = True
            if down:
                break
            if time.monotonic() > deadline:
                raise DrillError(f"{before.name}: the drill's probe still saw {before.primary_copy} "
                                 f"running as primary {self.s.timeout:.0f}s after the fault")
            await asyncio.sleep(0.1)  # probe interval
        detected = time.monotonic()
        candidate = await self.candidate(before)
        self.say(f"  manual: {before.primary_copy} is down; promoting {candidate}")
        report = await promote(self.store, self.agents, before.name, candidate)
        return detected, report.to_json()

    async def candidate(self, shard: Shard) -> str:
        keys = [k for k in shard.sync_standbys if k in shard.members and k != shard.primary_copy]
        ready: list[tuple[str, CopyStatus]] = []
        for key in keys:
            with contextlib.suppress(AgentError):
                status = await self.agents.copy_status(key, shard.name)
                if status.running and status.role == "standby" and status.position is not None:
                    ready.append((key, status))
        if not ready:
            raise DrillError(f"{shard.name}: no running standby of the synchronous set to promote")
        home = shard.primary.region
        ready.sort(key=lambda ks: (-(ks[1].timeline or 0), -(ks[1].position or 0),
                                   shard.members[ks[0]].region != home, ks[0]))
        return ready[0][0]


def no_failover_expected(shard: Shard, hosts: list[str]) -> str:
    """Why a fault that kills `hosts` leaves `shard` without an automatic failover ('' when
    it has one): the promotion primitive promotes a copy only when it is in the primary's
    synchronous standby set and every other member of the set was heard from
    (failover/promote.py, `not-in-sync-set`, `not-most-recent`); a member lost with the
    primary may hold confirmed bookings no surviving copy has, and an operator decides
    (`boxoffice shard promote --force`, which reports what may be lost)."""
    if shard.primary_copy not in hosts:
        return ""
    sync = [k for k in shard.sync_standbys if k in shard.members and k != shard.primary_copy]
    if not sync:
        return (f"{shard.name} has no synchronous standby (sync {shard.sync_mode}): no copy is known to "
                "hold every confirmed booking, so only an operator promotes")
    lost = [k for k in sync if k in hosts]
    if lost:
        return (f"the fault also takes {', '.join(lost)} of the synchronous standby set "
                f"({', '.join(sync)}), which may hold confirmed bookings no surviving copy has: "
                "only an operator promotes then (boxoffice shard promote --force)")
    return ""
