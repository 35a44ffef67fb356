"""The automatic failover controller: one per region, exactly one active.

`Controller.run()` contends for the controller lock (`failover.leadership`: a Consul
session lock, 1 s TTL, no lock delay) and, while it holds it, watches every shard:

- **Detection** needs two independent signals at once: the controller's own probe fails
  (the primary's node agent, `GET /agent/copies/{shard}`, short timeout, does not
  answer, or does not report the copy running as a primary) AND a second vantage point
  agrees, either
  - Consul's health check of the primary copy's booking-service instance is critical
    (followed with blocking queries; Consul runs it once a second, its minimum), or
  - the standbys' own view (`standby_signal`, on by default; VTOrc's DeadPrimary): the
    primary's agent does not answer at all (every round pings each primary's agent:
    `GET /agent/health`, nothing probed behind it) and every standby whose agent
    answers runs as a standby whose WAL receiver lost its stream
    (`standbys_lost_primary`). A lost host's walsenders die with it, so its standbys
    know within milliseconds; a host cut off without closing its connections keeps them
    "streaming" until `wal_receiver_timeout`, and then Consul's check is the signal.
  A critical check whose probe finds the primary answering is a check that lags (a
  postmaster its agent restarted, a booking service being restarted): nothing is done.
  The signal that started it is in the failover's record (`signal`). Shown by
  tests/test_supersede_logic.py `test_the_standbys_view_counts_only_when_every_standby_lost_it`
  and the drills (`detect` in their reports).
- **Confirmation**: both signals must hold, probed every `tick`, for `grace` seconds
  past detection (default 0.4 s); any probe that finds the primary answering again
  resets it. So a primary its node agent restarts within the grace is not failed over.
- **Decision**: a fresh (non-blocking) read of Consul's health and of the shard record,
  and one more probe; then the candidate (`choose_candidate`): among the running
  standbys of the shard's synchronous set on the highest timeline, the old primary's
  region's copies first (its zone standby), the highest WAL position among them; a copy
  in another region only when no home copy qualifies, and the record says why. Any
  synchronous standby may be chosen without loss: right after the primary died the zone
  standby may report less WAL received than another region's copy (asynchronous under
  FIRST 1, or only a few milliseconds faster), and the promotion's catch-up step first
  streams the rest from any listed standby that is ahead of it. Never outside the set
  (never `--force`): a shard with no candidate (`sync: off`, every synchronous standby
  down) waits for an operator. Shown by tests/test_supersede_logic.py
  `test_the_controller_promotes_the_home_zone_standby_when_another_region_received_more`
  and tests/test_controller.py (the zone standby is promoted when the primary's node is
  lost).
- **Promotion** is `failover.promote.promote(...)`, the emergency primitive: it checks
  the candidate again, repoints the other standbys before the promotion, and makes the
  map's check-and-set the commit point, under the shard's lease and journal.

Left alone: a shard whose primary is healthy; a shard whose lease (`shard-op-<shard>`)
another runner holds (an operator's promote, a switchover); a shard in a planned
transition (the switchover's `Shard.transition`), but only while its old primary's node
agent answers (a switchover stops the primary on purpose) and for `stale_transition`
seconds of this controller's own monotonic clock since it first saw that transition
(never by the wall time written in it: common/observed.py). A transition whose old
primary's host does not answer, or that has been seen for longer, is no reason to wait:
the shard is failed over like any other whose primary is down, and the promotion's
commit clears the transition (the switchover is superseded). Shown by
tests/test_controller.py
`test_a_switchover_whose_old_primary_host_is_lost_clears_its_transition_and_fails_over`.

Agent calls are bounded (`agent_timeout`, 30 s by default, for promote, stop and start;
status probes 1 s): a frozen host holds no lease for minutes.

**Every operation ends within a bound of this controller's own clock.** A promotion, a
finished journal, a resumed switchover or a settled event move runs as its own task,
waited for at most `operation_timeout` seconds (`time.monotonic()`, `asyncio.wait`, which
neither depends on a cancel being delivered nor swallows one). Past it the task is
cancelled and left behind if it ignores the cancel; whatever happened (success, refusal,
failure, an unexpected exception, the bound), the shard leaves `inProgress` and a shard
whose operation did not succeed is tried again after a backoff (`retry`, doubled per
consecutive failure up to `max_retry`), never left stuck. A task that ignored its
cancel changes nothing a later one could not overtake: it holds its shard's lease
(another promotion is refused `operation-in-progress` until the lease ends) and its
lease's sequencer fences its steps. Each evaluation round and each scan of the journals
is bounded too (`round_timeout`). Consul calls use `asyncio.timeout`, never
`asyncio.wait_for` (Python 3.11's wait_for returns a call's result when its caller is
cancelled just as the call completes: the cancel is lost), and a lease's renewer stops
on a flag, not only on its cancel (failover/lease.py). Shown by
tests/test_controller_bounds.py.

**Consul unreachable** never causes a promotion (nor a demotion: the controller never
demotes anything; node agents keep their roles without Consul): nothing is evaluated
while the map or the health view cannot be read, and the lock's term ends when it
cannot be renewed (`failover.leadership`).

**Journals**: on becoming active, and every `idle` seconds while active, the controller
looks at the unfinished promotions (`promote-*` journals) whose lease is free (their
runner died): one past its commit point (the map names its target at its new epoch) is
finished by running the primitive again with the journal's target, when that target's
node agent answers and its database runs; when it does not, the target is the map's
primary and it is down: the failover below overtakes the journal (failover/promote.py:
a promotion to another copy at the next epoch, checked against the synchronous set from
before the stuck promotion, the old primary a candidate too). One before its commit
point is rolled back by the next failover of its shard, which chooses its candidate
afresh; one the shard has moved past is removed. Abandoned switchovers are finished or
rolled back, unless their old primary's host does not answer (then the shard is failed
over, or the switchover's journal is tidied once the host answers again); abandoned
event moves too (event_ops/abandoned.py): finished past their flip, rolled back before
it, so an event never stays frozen because the runner of its move died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from common.observed import FirstSeen
from event_ops.abandoned import abandoned_moves, settle
from event_ops.shard_admin import ShardAdmin
from failover.agents import (
    AgentError,
    AgentFailed,
    AgentUnreachable,
    CopyStatus,
    NodeAgents,
    copy_statuses,
)
from failover.leadership import CONTROLLER_LOCK, Leadership, Term
from failover.lease import shard_lock
from failover.promote import (
    JOURNAL_KIND,
    PromoteError,
    PromoteFailed,
    PromoteReport,
    StepEvent,
    before_sync_set,
    effective_timelines,
    journal_id,
    overtakes,
    promote,
)
from failover.switchover import JOURNAL_KIND as SWITCHOVER_KIND
from failover.switchover import resume_switchover
from region_map import (
    BOOKING_SERVICE,
    CasConflict,
    HealthWatcher,
    MapError,
    MapStore,
    MapWatcher,
    NotFound,
    RegionMap,
    ServiceInstance,
    Shard,
)

log = logging.getLogger("boxoffice.failover.controller")

ACTIVE = Gauge("boxoffice_controller_active",
               "1 while this failover controller holds the controller lock and acts", ["region"])
FAILOVERS = Counter("boxoffice_failovers_total",
                    "Automatic promotions this controller ran, by outcome (promoted, finished: a "
                    "journal another runner left, refused, failed)", ["shard", "outcome"])
FAILOVER_SECONDS = Histogram(
    "boxoffice_failover_seconds",
    "Automatic failover, by phase: confirm (detection to decision: the grace), promote (the "
    "primitive), total (detection to the new primary promoted)",
    ["phase"], buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60))
LAST_FAILOVER = Gauge("boxoffice_failover_last_timestamp_seconds",
                      "When this controller last promoted a shard's new primary (Unix time)",
                      ["shard"])
LAST_FAILOVER_SECONDS = Gauge("boxoffice_failover_last_duration_seconds",
                              "Detection to promotion of this controller's last failover of a shard",
                              ["shard"])

FaultHook = Callable[[str], Awaitable[None]]
HISTORY = 100  # attempts kept for /status (which shows the last 20)
PING_TIMEOUT = 0.25  # seconds: the standby signal's ping of a primary's agent (then its standbys decide)


@dataclass(frozen=True)
class Settings:
    region: str
    grace: float = 0.4  # seconds both signals must hold past detection
    lock_ttl: float = 1.0  # the controller lock's session TTL (and the promotions' lease TTL)
    probe_timeout: float = 1.0  # one probe of a node agent
    tick: float = 0.1  # evaluation interval while a primary is suspected (or standby_signal)
    idle: float = 1.0  # otherwise (a health or map change wakes it at once)
    # The standbys' view as a detection signal beside Consul's check (module docstring):
    # each round pings every primary's node agent.
    standby_signal: bool = True
    retry: float = 1.0  # pause before trying a shard again after a refused or failed promotion
    status_url: str = ""  # where this controller's /status is served (written in the lock)
    stale_transition: float = 30.0  # seconds (own clock) a transition is waited for at most
    agent_timeout: float = 30.0  # promote, stop, start: a frozen host holds no lease for long
    operation_timeout: float = 180.0  # one promotion, resumed switchover or settled move, at most
    round_timeout: float = 30.0  # one evaluation round or one scan of the journals, at most
    max_retry: float = 30.0  # the backoff after consecutive failures grows up to this


@dataclass(frozen=True)
class Choice:
    """The copy to promote (None: none qualifies), and why it is not in the home region
    ('' when it is)."""

    key: str | None
    why: str = ""


def _qualifies(status: CopyStatus | BaseException | None) -> str:
    """'' for a running standby with a position; else what it is."""
    if status is None:
        return "not in the synchronous standby set"
    if isinstance(status, AgentError):
        return "its node agent did not answer" if isinstance(status, AgentUnreachable) else status.detail
    if isinstance(status, BaseException):
        return repr(status)
    if not status.running or status.role is None:
        return "its database is not running"
    if status.role != "standby" or status.position is None:
        return f"it runs as {status.role}"
    return ""


def choose_candidate(shard: Shard, statuses: dict[str, CopyStatus | BaseException],
                     home: str | None = None) -> Choice:
    """Among `statuses` (the synchronous standbys as their agents reported them), the copy
    to promote: the running standbys on the highest timeline (`effective_timelines`: the
    copies holding the shard's epoch row share its primary's); of those, the ones in the
    `home` region (the old primary's) first; then the highest WAL position, then the
    name. Another region's copy only when no home copy qualifies; `why` says so."""
    home = home or shard.primary.region
    ready = {k: s for k, s in statuses.items() if isinstance(s, CopyStatus) and not _qualifies(s)}
    if not ready:
        return Choice(None, "no synchronous standby runs as a standby that answers")
    timelines = effective_timelines(ready, shard.epoch)  # a disconnected standby's lags
    top = max(timelines.values())
    ready = {k: s for k, s in ready.items() if timelines[k] == top}
    at_home = [k for k in ready if shard.members[k].region == home]
    pool = at_home or list(ready)
    key = min(pool, key=lambda k: (-(ready[k].position or 0), k))
    if at_home:
        return Choice(key)
    reasons = [f"{k}: {_qualifies(statuses.get(k)) or 'on an older timeline'}"
               for k, m in sorted(shard.members.items())
               if m.region == home and k != shard.primary_copy]
    return Choice(key, f"no copy in {home} qualifies ({'; '.join(reasons) or 'it has none'}): "
                       f"{key} in {shard.members[key].region}")


def _wall(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Suspect:
    """A shard whose primary both signals call down, since `detected` (monotonic)."""

    primary: str
    epoch: int
    detected: float
    detected_wall: float
    signal: str = "consul"  # what called it down besides the probe: consul | standbys


@dataclass
class FailoverRecord:
    """One automatic promotion (or finished journal), for /status and the logs."""

    shard: str
    kind: str  # failover | resume
    target: str = ""
    old_primary: str = ""
    outcome: str = ""  # promoted | finished | already-primary | refused | failed | ...
    detail: str = ""
    old_epoch: int | None = None
    new_epoch: int | None = None
    signal: str = ""  # what called the primary down besides the probe: consul | standbys
    detected_at: float | None = None  # wall clock
    decided_at: float | None = None
    promoted_at: float | None = None
    confirm_seconds: float | None = None
    promote_seconds: float | None = None
    total_seconds: float | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 3)
        return {"shard": self.shard, "kind": self.kind, "target": self.target,
                "oldPrimary": self.old_primary, "outcome": self.outcome, "detail": self.detail,
                "signal": self.signal,
                "oldEpoch": self.old_epoch, "newEpoch": self.new_epoch,
                "detectedAt": _wall(self.detected_at), "decidedAt": _wall(self.decided_at),
                "promotedAt": _wall(self.promoted_at), "confirmSeconds": r(self.confirm_seconds),
                "promoteSeconds": r(self.promote_seconds), "totalSeconds": r(self.total_seconds),
                "steps": self.steps}


class _Map(MapWatcher):
    """The map in memory; after a failed query the next one is a plain read (index 0), so
    that `healthy` comes back as soon as Consul answers, not when a blocking query on an
    unchanged map ends."""

    async def _query(self, index: int) -> tuple[int, RegionMap]:
        return await super()._query(index if self.healthy else 0)


class _Health(HealthWatcher):
    """Consul's view of the booking-service instances, waking the controller on change
    and saying whether its last query succeeded (after a failure the next query is a
    plain read, as `_Map`'s)."""

    def __init__(self, store: MapStore, wake: asyncio.Event) -> None:
        super().__init__(store, BOOKING_SERVICE, max_backoff=0.5)
        self.wake = wake
        self.reachable = False

    async def _query(self, index: int) -> tuple[int, list[ServiceInstance]]:
        return await super()._query(index if self.reachable else 0)

    async def _deliver(self, instances: list[ServiceInstance]) -> bool:
        self.reachable = True
        news = await super()._deliver(instances)
        if news:
            self.wake.set()
        return news

    async def _failed(self, error: BaseException) -> None:
        self.reachable = False
        self.wake.set()


def standbys_lost_primary(statuses: Mapping[str, CopyStatus | AgentError]) -> bool:
    """The standbys' own view of their primary, a detection signal beside Consul's check
    (VTOrc's DeadPrimary: the primary unreachable AND its replicas not replicating): at
    least one standby answered, running as a standby, and none of those that answered
    streams WAL (every WAL receiver lost its primary). A standby whose agent does not
    answer, or whose database does not run, is no evidence either way; one that streams
    (from the primary, or from anyone) is evidence against."""
    seen = [s for s in statuses.values()
            if isinstance(s, CopyStatus) and s.running and s.role == "standby"]
    return bool(seen) and not any(s.streaming for s in seen)


def _primary_failing(instances: list[ServiceInstance], shard: Shard) -> bool:
    """Consul's check of the primary copy's instance is critical (an instance Consul does
    not know is no evidence)."""
    url = shard.primary.service_url
    return any(i.url == url and not i.passing for i in instances)


class Controller:
    def __init__(self, store: MapStore, token: str, settings: Settings, *,
                 fault_hook: FaultHook | None = None) -> None:
        self.store = store
        self.settings = settings
        self.fault_hook = fault_hook
        self.probes = NodeAgents(store, token, status_timeout=settings.probe_timeout)
        self.agents = NodeAgents(store, token, primitive_timeout=min(10.0, settings.agent_timeout),
                                 promote_timeout=settings.agent_timeout)
        self.shard_admin = ShardAdmin(token)  # booking services' operator calls (event moves)
        self.moves: set[str] = set()  # events whose abandoned move is being settled
        self.move_ages: FirstSeen[tuple[str, int]] = FirstSeen()  # move journals, by own clock
        self.transitions: FirstSeen[tuple[str, Any]] = FirstSeen()  # (shard, transition) seen
        self.why: dict[str, str] = {}  # shard -> why its candidate is not in its home region
        self.wake = asyncio.Event()
        self.map = _Map(store, max_backoff=0.5)
        self.map.add_listener(lambda _: self.wake.set())
        self.health = _Health(store, self.wake)
        owner = {"owner": f"failover controller {settings.region}", "region": settings.region,
                 "host": socket.gethostname(), "pid": os.getpid(), "status": settings.status_url}
        self.leadership = Leadership(store, owner, ttl=settings.lock_ttl)
        self.leadership.on_change = self._leadership_changed
        self.suspects: dict[str, Suspect] = {}
        self.running: set[str] = set()  # shards with a promotion in flight
        self.not_before: dict[str, float] = {}  # shard -> monotonic: back-off after a failure
        self.failures: dict[str, int] = {}  # shard -> consecutive failed operations (backoff)
        self.overdue: set[asyncio.Task[None]] = set()  # past their bound, ignoring their cancel
        self.noted: dict[str, str] = {}  # "<shard>:<topic>" -> the last thing logged (log once)
        self.rounds = 0  # evaluation rounds in the current term
        self.history: list[FailoverRecord] = []
        self.last_error: str | None = None
        ACTIVE.labels(settings.region).set(0)

    # -- lifetime -------------------------------------------------------------------------
    async def run(self) -> None:
        """Follow the map and the health checks, and contend for the lock, forever."""
        await self.map.start(first_load_timeout=2.0)
        await self.health.start(first_load_timeout=2.0)
        try:
            await self.leadership.run(self._term)
        finally:
            ACTIVE.labels(self.settings.region).set(0)
            await self.health.stop()
            await self.map.stop()
            await self.probes.close()
            await self.agents.close()
            await self.shard_admin.close()

    def _leadership_changed(self) -> None:
        ACTIVE.labels(self.settings.region).set(1 if self.leadership.active else 0)

    @property
    def consul_reachable(self) -> bool:
        return self.leadership.consul_reachable and self.map.healthy and self.health.reachable

    def status(self) -> dict[str, Any]:
        last = next((r for r in reversed(self.history) if r.kind == "failover"), None)
        return {
            "region": self.settings.region,
            "active": self.leadership.active,
            "activeSince": _wall(self.leadership.term.started_at) if self.leadership.term else None,
            "lock": CONTROLLER_LOCK,
            "holder": self.leadership.holder,
            "consulReachable": self.consul_reachable,
            "settings": {"graceMs": round(self.settings.grace * 1000),
                         "lockTtlSeconds": self.settings.lock_ttl,
                         "probeTimeoutMs": round(self.settings.probe_timeout * 1000)},
            "rounds": self.rounds,
            "suspects": {s: {"primary": v.primary, "epoch": v.epoch, "detectedAt": _wall(v.detected_wall)}
                         for s, v in self.suspects.items()},
            "inProgress": sorted(self.running),
            "lastFailover": last.to_json() if last else None,
            "history": [r.to_json() for r in self.history[-20:]],
            "lastError": self.last_error,
        }

    # -- one term as the active controller --------------------------------------------------
    async def _term(self, term: Term) -> None:
        self.rounds = 0
        self.suspects.clear()
        self.noted.clear()
        async with asyncio.TaskGroup() as tasks:  # cancelled with the term: stops at once
            await self._within("journals", self._journals(tasks))
            last_scan = time.monotonic()
            while not term.ended.is_set():
                self.wake.clear()
                await self._within("round", self._round(tasks))
                if time.monotonic() - last_scan >= self.settings.idle:
                    await self._within("journals", self._journals(tasks))
                    last_scan = time.monotonic()
                busy = self.suspects or self.running or self.settings.standby_signal
                pause = self.settings.tick if busy else self.settings.idle
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await self.wake.wait()

    async def _within(self, what: str, work: Coroutine[Any, Any, None]) -> None:
        """One round or journal scan, for at most `round_timeout` seconds: past it, it is
        abandoned (logged) and the next round starts."""
        try:
            async with asyncio.timeout(self.settings.round_timeout):
                await work
        except TimeoutError:
            log.error("controller step took too long: abandoned", extra={"step": what,
                      "seconds": self.settings.round_timeout})

    def _spawn(self, tasks: asyncio.TaskGroup, held: set[str], key: str, what: str,
               work: Coroutine[Any, Any, None]) -> None:
        """Start an operation on `key` (a shard, or an event for moves), marked in `held`
        (`self.running`, `self.moves`) until it ends, within its bound."""
        held.add(key)
        tasks.create_task(self._bounded(held, key, what, work), name=f"{what}-{key}")

    async def _bounded(self, held: set[str], key: str, what: str,
                       work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as its own task for at most `operation_timeout` seconds of this
        controller's monotonic clock, then cancel it; `key` leaves `held` whatever
        happened, and a shard whose operation did not end by itself is retried after a
        backoff. Cancelled (the term ends), it cancels the work and ends at once."""
        inner = asyncio.create_task(work, name=f"{what}-{key}-work")
        ok = False
        try:
            try:
                done, _ = await asyncio.wait([inner], timeout=self.settings.operation_timeout)
            except asyncio.CancelledError:
                ok = True  # the term ended: no failure of the shard's, no backoff
                raise
            if done:
                if inner.cancelled():
                    return
                exc = inner.exception()
                if exc is None:
                    ok = True
                    return
                log.error("controller operation failed unexpectedly", exc_info=exc,
                          extra={"key": key, "operation": what})
                return
            log.error("controller operation did not end within its bound: cancelled; "
                      "tried again after a backoff",
                      extra={"key": key, "operation": what, "seconds": self.settings.operation_timeout})
            self.last_error = f"{key}: {what} did not end within {self.settings.operation_timeout:.0f}s"
            if held is self.running:
                FAILOVERS.labels(key, "timed-out").inc()
                self._remember(FailoverRecord(key, what, outcome="timed-out",
                                              detail=self.last_error, decided_at=time.time()))
        finally:
            if not inner.done():
                inner.cancel()
                self.overdue.add(inner)  # kept referenced; forgotten once it ends
                inner.add_done_callback(self.overdue.discard)
            held.discard(key)
            if held is self.running and not ok:
                self._back_off(key)
            self.wake.set()

    def _back_off(self, name: str) -> None:
        """The shard is not tried again for `retry` seconds, doubled per consecutive
        failure up to `max_retry` (at least what a failure already set)."""
        n = self.failures.get(name, 0) + 1
        self.failures[name] = n
        pause = min(self.settings.retry * 2 ** (n - 1), max(self.settings.max_retry, self.settings.retry))
        self.not_before[name] = max(self.not_before.get(name, 0.0), time.monotonic() + pause)

    def _note(self, key: str, message: str, level: int = logging.INFO, **extra: Any) -> None:
        """Log a shard's situation once, not every round (`key`: "<shard>:<topic>")."""
        if self.noted.get(key) != message:
            self.noted[key] = message
            log.log(level, message, extra={"shard": key.partition(":")[0], **extra})

    async def _round(self, tasks: asyncio.TaskGroup) -> None:
        region_map = self.map.current
        if region_map is None or not self.consul_reachable:
            self.suspects.clear()  # evidence must be continuous, and Consul is part of it
            return
        instances = self.health.instances
        now = time.monotonic()
        lost = await self._lost_by_standbys(region_map, instances, now)
        critical = []
        self.transitions.keep((s.name, s.transition) for s in region_map.shards.values()
                              if s.transition is not None)
        for shard in region_map.shards.values():
            suspect = self.suspects.get(shard.name)
            if suspect and (suspect.primary, suspect.epoch) != (shard.primary_copy, shard.epoch):
                del self.suspects[shard.name]  # the map moved on
            if shard.name in self.running or self.not_before.get(shard.name, 0) > now:
                continue
            if _primary_failing(instances, shard) or shard.name in lost:
                critical.append(shard)
            elif self._planned(shard):
                self.suspects.pop(shard.name, None)
                self._note(f"{shard.name}:transition", "shard in a planned transition: left alone")
            elif (self.suspects.pop(shard.name, None) is not None
                  or self.noted.pop(f"{shard.name}:health", None) is not None):
                log.info("primary's check passes again", extra={"shard": shard.name,
                                                                "primary": shard.primary_copy})
        probes = await asyncio.gather(*(self._probe_state(s) for s in critical))
        for shard, state in zip(critical, probes, strict=True):
            if state is None:
                continue  # no conclusion (the registry did not answer): no change either way
            alive = state == "primary"
            if not alive and state != "lost" and self._planned(shard):
                # a switchover stops its old primary on purpose: its agent answers
                self.suspects.pop(shard.name, None)
                self._note(f"{shard.name}:transition", "shard in a planned transition: left alone")
                continue
            if alive:
                self.suspects.pop(shard.name, None)
                self._note(f"{shard.name}:health",
                           "consul's check is critical but the primary answers: waiting",
                           primary=shard.primary_copy)
                continue
            suspect = self.suspects.get(shard.name)
            if suspect is None:
                signal = "consul" if _primary_failing(instances, shard) else "standbys"
                self.suspects[shard.name] = Suspect(shard.primary_copy, shard.epoch,
                                                    time.monotonic(), time.time(), signal)
                self._note(f"{shard.name}:health",
                           "primary down: consul's check critical and the probe failed"
                           if signal == "consul" else "primary down: its host's agent does not "
                           "answer and every standby that answers lost its WAL stream",
                           logging.WARNING, primary=shard.primary_copy, epoch=shard.epoch)
            elif time.monotonic() - suspect.detected >= self.settings.grace:
                self._spawn(tasks, self.running, shard.name, "failover",
                            self._fail_over(shard.name, suspect))
        self.rounds += 1

    async def _lost_by_standbys(self, region_map: RegionMap, instances: list[ServiceInstance],
                                now: float) -> set[str]:
        """The shards whose primary the standbys' view calls down (`standby_signal`): its
        node agent does not answer a ping, and `standbys_lost_primary`. Shards Consul
        already calls critical, being handled, backed off or in a planned transition are
        not looked at (the usual path sees them). A ping is cheap (no database probed);
        only a primary whose agent does not answer costs its standbys' status calls."""
        if not self.settings.standby_signal:
            return set()
        shards = [s for s in region_map.shards.values()
                  if s.name not in self.running and self.not_before.get(s.name, 0) <= now
                  and not _primary_failing(instances, s) and not self._planned(s)]

        async def silent(host: str) -> bool:
            try:  # short: a frozen agent must not hold up every shard's round
                await self.probes.ping(host, min(PING_TIMEOUT, self.settings.probe_timeout))
                return False
            except AgentUnreachable as exc:
                return exc.host != "*"  # "*": the registry did not answer: no conclusion
            except AgentError:  # it answered, if oddly: not lost
                return False

        hosts = sorted({s.primary_copy for s in shards})  # one ping per host, not per shard
        answers = dict(zip(hosts, await asyncio.gather(*(silent(h) for h in hosts)), strict=True))
        suspects = [s for s in shards if answers[s.primary_copy]]
        found = await asyncio.gather(*(self._standbys_lost(s) for s in suspects))
        return {s.name for s, gone in zip(suspects, found, strict=True) if gone}

    async def _standbys_lost(self, shard: Shard) -> bool:
        """`standbys_lost_primary` for the shard's copies other than its primary, as their
        agents report them now."""
        keys = [k for k in shard.members if k != shard.primary_copy]
        return standbys_lost_primary(await copy_statuses(self.probes, keys, shard.name))

    def _planned(self, shard: Shard) -> bool:
        """The shard is in a planned transition this controller has seen for less than
        `stale_transition` seconds of its own clock."""
        if shard.transition is None:
            return False
        return self.transitions.age((shard.name, shard.transition)) < self.settings.stale_transition

    async def _probe(self, shard: Shard) -> bool | None:
        """Whether the primary copy runs as a primary, as its node agent reports it: True,
        False (no answer from the agent, the copy not running, not answering, or in
        recovery), None (no conclusion: the registry or the agent's answer is unusable)."""
        state = await self._probe_state(shard)
        return None if state is None else state == "primary"

    async def _probe_state(self, shard: Shard) -> str | None:
        """The primary copy as its node agent reports it: 'primary' (running as one),
        'down' (the agent answers: not running, not answering, or in recovery), 'lost'
        (the agent does not answer: its host is gone or cut off), None (no conclusion)."""
        state = await copy_state(self.probes, shard.primary_copy, shard.name)
        return state if state in (None, "primary", "lost") else "down"

    # -- a failover ---------------------------------------------------------------------------
    async def _fail_over(self, name: str, suspect: Suspect) -> None:
        decided = time.monotonic()
        record = FailoverRecord(name, "failover", old_primary=suspect.primary, old_epoch=suspect.epoch,
                                signal=suspect.signal, detected_at=suspect.detected_wall,
                                decided_at=time.time(), confirm_seconds=decided - suspect.detected)
        try:
            target, journal = await self._decide(name, suspect)
            if target is None:
                return
            record.target = target
            why = self.why.pop(name, "")
            log.warning("failing over", extra={"shard": name, "from": suspect.primary, "to": target,
                                               "overtaking": journal, "awayFromHome": why,
                                               "confirmSeconds": round(decided - suspect.detected, 3)})
            report = await self._promote(name, target)
            done = time.monotonic()
            if why:
                report.notes.insert(0, why)
            self._finished(record, report, done - decided, done - suspect.detected)
            FAILOVER_SECONDS.labels("confirm").observe(decided - suspect.detected)
            FAILOVER_SECONDS.labels("promote").observe(done - decided)
            FAILOVER_SECONDS.labels("total").observe(done - suspect.detected)
        except PromoteError as exc:
            self._failed(record, exc)
        except (MapError, AgentError) as exc:
            self._failed(record, PromoteFailed("dependency", str(exc)))
        except Exception as exc:  # a bug must not end the term: logged, retried
            log.exception("automatic failover failed unexpectedly", extra={"shard": name})
            self._failed(record, PromoteFailed("unexpected", repr(exc)))
        finally:  # `running` is cleared by `_bounded`, which ran this
            self.suspects.pop(name, None)
            self.wake.set()

    async def _decide(self, name: str, suspect: Suspect) -> tuple[str | None, bool]:
        """Check again, from fresh reads, that the failover is due; (the target, whether it
        overtakes a committed promotion whose target is the primary that is down), or
        (None, False) when it is not due."""
        shard, _ = await self.store.read_shard(name)
        if (shard.primary_copy, shard.epoch) != (suspect.primary, suspect.epoch):
            return None, False
        _, instances = await self.store.watch_instances(BOOKING_SERVICE, 0)  # Consul, now
        state = await self._probe_state(shard)
        if state in (None, "primary") or not (
                _primary_failing(instances, shard)
                or (state == "lost" and self.settings.standby_signal
                    and await self._standbys_lost(shard))):
            log.info("failover called off: the primary answers again", extra={"shard": name})
            return None, False
        if state != "lost" and self._planned(shard):
            return None, False
        holder = await self.store.lock_holder(shard_lock(name))
        if holder.session is not None:
            self._note(f"{name}:lease", "another runner holds the shard's lease: left alone",
                       holder=holder.value)
            self.not_before[name] = time.monotonic() + self.settings.retry
            return None, False
        try:
            doc, _ = await self.store.read_journal(journal_id(name))
        except NotFound:
            doc = None
        if doc is not None and overtakes(shard, doc):
            # A promotion committed to the primary that is down, never finished: when its
            # target still runs, finish it; else overtake it, choosing among the copies
            # that held every confirmed booking before it (failover/promote.py).
            if await copy_state(self.probes, shard.primary_copy, name) in ("primary", "standby"):
                return shard.primary_copy, False
            old = str(doc.get("from", ""))
            keys = [k for k in before_sync_set(shard, doc) if k != shard.primary_copy]
            keys += [old] if old in shard.members else []
            home = shard.members[old].region if old in shard.members else None
            target = await self._candidate(shard, keys, home)
            if target is not None:
                return target, True
        else:  # none, or one before its commit point: the promotion rolls it back
            target = await self._candidate(shard)
        if target is None:
            self._note(f"{name}:candidate", "no candidate in the synchronous standby set: an operator "
                       "must decide (boxoffice shard promote --force)", logging.ERROR,
                       syncStandbys=list(shard.sync_standbys))
            self.not_before[name] = time.monotonic() + self.settings.retry
        return target, False

    async def _candidate(self, shard: Shard, keys: list[str] | None = None,
                         home: str | None = None) -> str | None:
        """`choose_candidate` among `keys` (the shard's synchronous set unless given), as
        their agents report them now; why it is away from `home` is kept in `self.why`."""
        if keys is None:
            keys = list(shard.sync_standbys)
        keys = list(dict.fromkeys(k for k in keys if k in shard.members and k != shard.primary_copy))
        # Asked with the primitives' status timeout (2 s), not the probes' 1 s: a home copy
        # whose agent is only slow (a loaded host) must not send the shard abroad.
        statuses = await copy_statuses(self.agents, keys, shard.name)
        choice = choose_candidate(shard, dict(statuses), home)
        if choice.why and choice.key is not None:
            self.why[shard.name] = choice.why
            self._note(f"{shard.name}:home", f"failing over away from home: {choice.why}", logging.WARNING)
        return choice.key

    async def _promote(self, name: str, target: str) -> PromoteReport:
        def progress(event: StepEvent) -> None:
            if event.state == "ok":
                log.info("promote step done", extra={"shard": name, "step": event.step,
                                                     "seconds": round(event.seconds or 0, 3),
                                                     "detail": event.detail})

        return await promote(self.store, self.agents, name, target, progress=progress,
                             fault_hook=self.fault_hook, owner=f"failover controller {self.settings.region}",
                             lease_ttl=max(self.settings.lock_ttl, 1.0))

    def _finished(self, record: FailoverRecord, report: PromoteReport, promote_s: float,
                  total_s: float | None) -> None:
        record.outcome = report.resumed if report.resumed == "finished" else report.outcome
        record.target, record.old_primary = report.new_primary, report.old_primary or record.old_primary
        record.old_epoch, record.new_epoch = report.old_epoch, report.new_epoch
        record.promoted_at, record.promote_seconds, record.total_seconds = time.time(), promote_s, total_s
        record.steps = [{"name": s.name, "seconds": round(s.seconds, 3), "detail": s.detail}
                        for s in report.steps]
        record.detail = "; ".join(report.notes)
        self.failures.pop(record.shard, None)  # the backoff starts afresh
        FAILOVERS.labels(record.shard, record.outcome).inc()
        LAST_FAILOVER.labels(record.shard).set(record.promoted_at)
        if total_s is not None:
            LAST_FAILOVER_SECONDS.labels(record.shard).set(total_s)
        self._remember(record)
        for topic in ("health", "candidate", "lease"):
            self.noted.pop(f"{record.shard}:{topic}", None)
        times = {k: v for k, v in record.to_json().items() if k.endswith("Seconds")}
        log.warning("failover done" if record.kind == "failover" else "unfinished promotion finished",
                    extra={"shard": record.shard, "outcome": record.outcome, "from": record.old_primary,
                           "to": record.target, "epoch": record.new_epoch, **times})

    def _remember(self, record: FailoverRecord) -> None:
        self.history.append(record)
        del self.history[:-HISTORY]

    def _failed(self, record: FailoverRecord, exc: PromoteError) -> None:
        record.outcome = "refused" if not isinstance(exc, PromoteFailed) else "failed"
        record.detail = f"{exc.kind}: {exc.detail}"
        FAILOVERS.labels(record.shard, record.outcome).inc()
        self._remember(record)
        self.last_error = f"{record.shard}: {record.detail}"
        self._back_off(record.shard)
        log.error("automatic promotion did not happen; trying again if still due",
                  extra={"shard": record.shard, "target": record.target, "kind": exc.kind,
                         "detail": exc.detail})

    # -- unfinished promotions ------------------------------------------------------------------
    async def _journals(self, tasks: asyncio.TaskGroup) -> None:
        """Finish what a dead runner left past its commit point; clear what is stale."""
        try:
            journals = await self.store.list_journals(JOURNAL_KIND)
        except MapError as exc:
            log.warning("journals not read", extra={"error": str(exc)})
            return
        for op_id, (doc, index) in journals.items():
            name, target = str(doc.get("shard", "")), str(doc.get("target", ""))
            if not name or name in self.running or self.not_before.get(name, 0) > time.monotonic():
                continue
            try:
                if (await self.store.lock_holder(shard_lock(name))).session is not None:
                    continue  # its runner is alive
                shard, _ = await self.store.read_shard(name)
            except (MapError, ValueError) as exc:
                log.warning("journal not examined", extra={"journal": op_id, "error": str(exc)})
                continue
            if shard.primary_copy == target and shard.epoch == doc.get("newEpoch"):
                if await copy_state(self.probes, target, name) not in ("primary", "standby"):
                    # its target's database does not run, or its host does not answer: the
                    # failover of a primary that is down overtakes it; nothing to finish
                    self._note(f"{name}:journal", "an unfinished promotion past its commit point "
                               "whose target does not run: overtaken if its host stays lost",
                               target=target)
                    continue
                log.warning("an unfinished promotion past its commit point: finishing it",
                            extra={"shard": name, "target": target, "startedAt": doc.get("startedAt")})
                self._spawn(tasks, self.running, name, "resume", self._finish(name, target, doc))
            elif shard.primary_copy == doc.get("from") and shard.epoch == doc.get("fromEpoch"):
                self._note(f"{name}:journal", "an unfinished promotion before its commit point: "
                           "continued only if the primary is down", target=target)
            else:
                try:
                    await self.store.delete_journal(op_id, index)
                    log.warning("stale promotion journal removed", extra={"journal": op_id, "doc": doc})
                except (CasConflict, MapError):
                    pass  # changed meanwhile: looked at again next time
        await self._switchover_journals(tasks)
        await self._move_journals(tasks)

    async def _move_journals(self, tasks: asyncio.TaskGroup) -> None:
        """Event moves whose runner died: finished past their flip, rolled back before."""
        try:
            found = await abandoned_moves(self.store, seen=self.move_ages)
        except MapError as exc:
            log.warning("move journals not read", extra={"error": str(exc)})
            return
        for event_id, doc in found:
            if event_id in self.moves:
                continue
            log.warning("an abandoned event move: finishing or rolling it back",
                        extra={"event_id": event_id, "target": doc.get("target"),
                               "step": doc.get("step")})
            self._spawn(tasks, self.moves, event_id, "settle-move", self._settle_move(event_id, doc))

    async def _settle_move(self, event_id: str, doc: dict[str, Any]) -> None:
        try:
            done = await settle(self.store, self.shard_admin, event_id, doc,
                                owner=f"failover controller {self.settings.region}")
            level = logging.ERROR if done.action == "failed" else logging.WARNING
            log.log(level, f"abandoned event move {done.action}",
                    extra={"event_id": event_id, "detail": done.detail})
        except (MapError, OSError) as exc:
            log.error("abandoned event move not settled", extra={"event_id": event_id, "error": str(exc)})

    async def _switchover_journals(self, tasks: asyncio.TaskGroup) -> None:
        """A planned switchover whose runner died leaves its shard holding writes (a
        transition) and possibly its old primary stopped: finish it past its commit
        point, roll it back before (failover/switchover.py `resume_switchover`)."""
        try:
            journals = await self.store.list_journals(SWITCHOVER_KIND)
        except MapError as exc:
            log.warning("switchover journals not read", extra={"error": str(exc)})
            return
        for doc, _ in journals.values():
            name = str(doc.get("shard", ""))
            if not name or name in self.running or self.not_before.get(name, 0) > time.monotonic():
                continue
            try:
                if (await self.store.lock_holder(shard_lock(name))).session is not None:
                    continue  # its runner is alive
                shard, _ = await self.store.read_shard(name)
            except (MapError, NotFound, ValueError):
                continue
            old, target = str(doc.get("from", "")), str(doc.get("target", ""))
            committed = shard.primary_copy == target and shard.epoch == doc.get("newEpoch")
            if (old in shard.members and await copy_state(self.probes, old, name) in ("lost", None)
                    and (not committed or await copy_state(self.probes, target, name) == "primary")):
                # Its old primary's host does not answer: nothing can restart it now. Before
                # the commit point the shard is failed over as any whose primary is down
                # (the promotion's commit clears the transition); after it (its target
                # promoted), its journal is tidied once the host answers again.
                self._note(f"{name}:switchover", "an abandoned switchover whose old primary's host "
                           "does not answer: left until it does (the shard fails over meanwhile)",
                           old=old)
                continue
            log.warning("an abandoned switchover: finishing or rolling it back",
                        extra={"shard": name, "target": doc.get("target")})
            self._spawn(tasks, self.running, name, "resume-switchover", self._resume_switchover(name))

    async def _resume_switchover(self, name: str) -> None:
        try:
            report = await resume_switchover(self.store, self.agents, name,
                                             owner=f"failover controller {self.settings.region}")
            if report is not None:
                log.warning("abandoned switchover resolved",
                            extra={"shard": name, "outcome": report.outcome, "resumed": report.resumed})
        except (PromoteError, MapError, AgentError) as exc:
            self._back_off(name)
            log.error("abandoned switchover not resolved", extra={"shard": name, "error": str(exc)})

    async def _finish(self, name: str, target: str, doc: dict[str, Any]) -> None:
        started = time.monotonic()
        record = FailoverRecord(name, "resume", target=target, old_primary=str(doc.get("from", "")),
                                decided_at=time.time())
        try:
            report = await self._promote(name, target)
            self._finished(record, report, time.monotonic() - started, None)
        except PromoteError as exc:
            self._failed(record, exc)
        except (MapError, AgentError) as exc:
            self._failed(record, PromoteFailed("dependency", str(exc)))


async def copy_state(probes: NodeAgents, copy: str, shard: str) -> str | None:
    """A copy as its node agent reports it: 'primary' or 'standby' (running as one),
    'stopped' (the agent answers, the copy's database does not), 'lost' (the agent does
    not answer: its host is gone or cut off), None (no conclusion: the registry did not
    answer, or the agent does not own the copy)."""
    try:
        status = await probes.copy_status(copy, shard)
    except AgentUnreachable as exc:
        return None if exc.host == "*" else "lost"
    except AgentFailed:
        return "stopped"
    except AgentError:  # refused: the agent does not own the copy (configuration)
        return None
    if not status.running or status.role not in ("primary", "standby"):
        return "stopped"
    return status.role


def exit_after(step: str, code: int = 70) -> FaultHook:
    """Tests only: a fault hook that ends the process right after promotion step `step`
    (`BOXOFFICE_CONTROLLER_FAULT=exit-after:commit`), as a controller dying half-way."""

    async def hook(done: str) -> None:
        if done == step:
            log.error("fault injected: exiting after a promote step", extra={"step": step})
            logging.shutdown()
            os._exit(code)

    return hook
