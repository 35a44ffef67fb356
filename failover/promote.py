"""Emergency promotion of a shard copy: `promote(store, agents, shard, target)`.

The primitive `boxoffice shard promote`, `POST /admin/shards/{shard}/promote` and the
failover controller all run. Patroni's rules, in this order:

1. check: the shard record and its modify index are read; the target (`resolve_copy`)
   must be a running standby, in the synchronous standby set (`sync_standbys`) unless
   `force`. When the set lists more than one standby (`sync: region` is `ANY 1 (...)`:
   a confirmed commit is on at least one of them, not on each) every listed standby
   must answer and none may be ahead of the candidate (timeline, then WAL position),
   else refused unless `force`. With `force` the report says what may be lost: every
   copy ahead of the candidate, every copy not heard from.
2. catch-up: wait (bounded) until the candidate has replayed all the WAL it received;
   its replay position is where the new epoch begins (`epoch_lsn`). When a listed
   synchronous standby is ahead of the candidate (every listed one answered, same
   timeline), the candidate first follows the most advanced of them (cascading
   replication) until it has what that one has: a commit confirmed by another member
   of the set, or WAL never confirmed at all, is then on the candidate too, so the
   candidate the operator (or the controller) chose is promoted without loss.
3. sync-set: the candidate's synchronous standby set for after the promotion
   (`next_sync_set`), set while it is still a standby (ALTER SYSTEM works in recovery),
   so that no booking can commit under the new epoch without it.
4. repoint: every other reachable standby follows the candidate (a cascading standby
   until the promotion, then on the new timeline).
5. commit: the shard record is replaced by check-and-set on the index read in step 1:
   the candidate is primary, epoch + 1 exactly (the store refuses anything else). THE
   COMMIT POINT: before it the promotion can be undone, after it it is finished.
6. promote: the candidate's agent runs pg_promote and writes the epoch row as the new
   primary's first write (that commit waits for the set of step 3).

The old primary is not touched: once the map names another copy at a higher epoch, its
node agent demotes it (or, if it is down, starts it) as a standby of the new primary,
rewound when its history diverged.

Every operation on a shard holds a lease (a Consul session lock, `shard-op-<shard>`) and
keeps a journal (`promote-<shard>` under the ops prefix, which gateways do not watch).
A runner that dies leaves the journal; its lease expires within about twice its TTL.
Running the promotion again then resumes: if the map already names the target at the
journal's new epoch the commit happened and the remaining steps are finished; if the map
still names the old primary at the old epoch the attempt is rolled back (standbys it
repointed are pointed back at the old primary when that answers as a primary; else they
stay on the candidate, which is harmless: a cascading standby receives the same WAL one
hop later, and its agent repoints it when the map's primary changes) and a fresh
promotion starts. Every step is idempotent.

**Every promotion can be superseded.** A journal left by a runner whose lease is gone
never pins the shard to its target:

- before its commit point, a promotion to another copy rolls it back and starts afresh;
- past its commit point, when its target never became writable (its node agent does
  not answer, or it does not run as a primary: the host was lost between the commit and
  the promotion), a promotion to another copy overtakes it: the map's check-and-set on
  the record naming the dead target is the commit point, at its epoch + 1. The new
  candidate must hold every booking confirmed before: the dead target never wrote its
  epoch row, so nothing was confirmed under its epoch, and the candidate is checked
  against the synchronous set from before the stuck promotion (`fromSyncStandbys` in
  its journal) with the usual rules (in the set; when the set lists several, each
  answers and none is ahead on another timeline; a listed one ahead is caught up from).
  The old primary counts as a member of that set when it answers (it holds every
  booking it confirmed, and all the dead target ever received); when it does not, the
  dead target stays listed and is not heard from. Should a copy that answers hold the
  dead target's epoch row (it was promoted after all), the rules of any failover of it
  apply instead: its own synchronous set. Every member of that set must answer either
  way (one that does not might hold a booking confirmed under the dead target's epoch).
  `force` promotes past any of these refusals and reports what may be lost.

The controller overtakes the same way when the map's primary is down and a committed
journal names it (failover/controller.py); `boxoffice shard promote --to <other>` does,
by hand. Shown by tests/test_promote.py
`test_a_committed_promotion_whose_target_died_is_overtaken_by_a_promotion_to_another_copy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from failover.agents import (
    AgentError,
    AgentRefused,
    Agents,
    AgentUnreachable,
    CopyStatus,
    application_name,
    copy_statuses,
    under_lease,
)
from failover.lease import Lease, LeaseHeld, shard_lock
from region_map import (
    CasConflict,
    EpochRuleViolation,
    MapError,
    MapStore,
    NotFound,
    Region,
    Shard,
)

log = logging.getLogger("boxoffice.failover")

JOURNAL_KIND = "promote-"
CATCH_UP_TIMEOUT = 30.0  # seconds for the candidate to replay what it received
CATCH_UP_POLL = 0.05


def journal_id(shard: str) -> str:
    return f"{JOURNAL_KIND}{shard}"


@dataclass(frozen=True)
class StepEvent:
    """Progress: a step begins ("begin") or ends ("ok"), with a human detail."""

    step: str
    state: str
    detail: str = ""
    seconds: float | None = None


Progress = Callable[[StepEvent], None]
FaultHook = Callable[[str], Awaitable[None]]  # tests: called after each step by its name


class PromoteError(Exception):
    """The promotion did not happen; `kind` is a stable machine name."""

    def __init__(self, kind: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.extra = extra


class PromoteRefused(PromoteError):
    """Refused before anything changed (or after rolling back what had): the shard's
    state does not allow it (HTTP 409, exit code 1)."""


class PromoteFailed(PromoteError):
    """A dependency (Consul, a node agent, a database) failed (HTTP 503, exit code 2).
    `committed` says whether the map already names the target; the journal is kept when
    running the command again is needed to finish or roll back."""

    def __init__(self, kind: str, detail: str, *, committed: bool = False, **extra: Any) -> None:
        super().__init__(kind, detail, committed=committed, **extra)
        self.committed = committed


@dataclass
class StepRecord:
    name: str
    seconds: float
    detail: str = ""


@dataclass
class PromoteReport:
    shard: str
    target: str
    outcome: str = ""  # promoted | finished | already-primary
    old_primary: str = ""
    new_primary: str = ""
    old_epoch: int = 0
    new_epoch: int = 0
    epoch_lsn: str | None = None
    sync_mode: str = ""  # the shard's
    sync_standbys: list[str] = field(default_factory=list)  # the new set, copy keys
    synchronous_standby_names: str | None = None  # as the candidate's agent set it
    positions: dict[str, str | None] = field(default_factory=dict)  # copy -> LSN held, when heard
    repointed: list[str] = field(default_factory=list)
    not_repointed: dict[str, str] = field(default_factory=dict)
    forced: bool = False
    lost: dict[str, Any] | None = None  # with force: what may be lost
    resumed: str | None = None  # finished | rolled-back | stale-journal-cleared
    old_primary_next: str = ""
    notes: list[str] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "shard": self.shard, "target": self.target, "outcome": self.outcome,
            "oldPrimary": self.old_primary, "newPrimary": self.new_primary,
            "oldEpoch": self.old_epoch, "newEpoch": self.new_epoch, "epochLsn": self.epoch_lsn,
            "syncMode": self.sync_mode, "syncStandbys": self.sync_standbys,
            "synchronousStandbyNames": self.synchronous_standby_names,
            "positions": self.positions, "repointed": self.repointed,
            "notRepointed": self.not_repointed, "forced": self.forced, "lost": self.lost,
            "resumed": self.resumed, "oldPrimaryNext": self.old_primary_next, "notes": self.notes,
            "steps": [{"name": s.name, "seconds": round(s.seconds, 4), "detail": s.detail}
                      for s in self.steps],
            "seconds": round(self.seconds, 4),
        }


def next_sync_set(shard: Shard, candidate: str,
                  regions: Mapping[str, Region] | None = None) -> tuple[str, list[str]]:
    """(the agent's sync mode, the copy keys) of the candidate's synchronous standby set
    once it is the primary, from the shard's `sync_mode`:

    - zone: `FIRST 1` of the other copies in the candidate's region (by zone: the old
      primary's copy when the zone standby is promoted, which its node agent brings back
      as a rewound standby), then the copies in the other regions, nearest first:
      Postgres waits for the first of them that is connected, so losing the candidate's
      zone partner (its whole zone gone, or the old primary's host right after a
      failover) moves the synchronous wait to the nearest other region instead of
      stopping every commit, and a confirmed commit is always on a second copy. A region
      with no second copy: `ANY 1` of the other regions' copies;
    - region: `ANY 1` of the copies in the other regions (falling back to the same
      region's copies when there are none);
    - off: none.

    "Nearest" is by the candidate's region record's latency figures (`regions`, the
    map's; a region they do not list comes after the listed ones; without them, by
    name). It matters most right after a failover: the first commit of the new epoch
    (its epoch row, then every booking) waits until that standby has followed the new
    primary onto its timeline, a few round trips to it (issue 16: ap-south before
    eu-west for us-east cost 0.7 s where eu-west takes a third of it).
    """
    if shard.sync_mode == "off":
        return "off", []
    here = shard.members[candidate].region
    others = [k for k in shard.members if k != candidate]
    same = sorted((k for k in others if shard.members[k].region == here),
                  key=lambda k: shard.members[k].zone)
    origin = (regions or {}).get(here)

    def distance(key: str) -> tuple[int, str, str]:
        member = shard.members[key]
        far = origin.distance_to(member.region) if origin is not None else 0
        return far, member.region, member.zone

    elsewhere = sorted((k for k in others if shard.members[k].region != here), key=distance)
    if shard.sync_mode == "zone":
        if same:
            return "zone", same + elsewhere
        return ("region", elsewhere) if elsewhere else ("off", [])
    if elsewhere:
        return "region", elsewhere
    return ("zone", same) if same else ("off", [])


def before_sync_set(shard: Shard, doc: dict[str, Any]) -> list[str]:
    """The synchronous standby set of the shard before the promotion journalled in `doc`
    (its `fromSyncStandbys`; for a journal written before it was recorded: the set the
    map has now, which names the other copies, with the old primary replaced by the
    journal's target)."""
    listed = doc.get("fromSyncStandbys")
    if isinstance(listed, list):
        return [str(k) for k in listed if str(k) in shard.members]
    old, target = doc.get("from"), str(doc.get("target", ""))
    return [k for k in shard.sync_standbys if k != old] + ([target] if target in shard.members else [])


def overtakes(shard: Shard, doc: dict[str, Any]) -> bool:
    """The journal `doc` is past its commit point: the map names its target at its epoch."""
    return shard.primary_copy == doc.get("target") and shard.epoch == doc.get("newEpoch")


def effective_timelines(statuses: Mapping[str, CopyStatus | BaseException], epoch: int) -> dict[str, int]:
    """Each answering copy's timeline, for comparing copies. A standby that is not
    streaming (its primary just died) reports the timeline of its last restartpoint,
    which lags behind a promotion; but a copy whose epoch row is `epoch` replayed the
    first write of that epoch's primary, so it is on that primary's history: all of them
    count as on the highest timeline any of them reports. (A diverged old primary keeps
    an older epoch row, and its own timeline.)"""
    copies = {k: s for k, s in statuses.items() if isinstance(s, CopyStatus)}
    top = max((s.timeline or 0 for s in copies.values() if s.epoch == epoch), default=0)
    return {k: top if s.epoch == epoch else s.timeline or 0 for k, s in copies.items()}


def _heard(status: CopyStatus | AgentError | None) -> bool:
    return isinstance(status, CopyStatus) and status.role is not None and status.position is not None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def host_lost(exc: AgentError) -> bool:
    """The node agent did not answer at all (its host is gone, frozen or cut off), as
    opposed to answering that it could not do something."""
    return isinstance(exc, AgentUnreachable)


def _reason(exc: AgentError) -> str:
    if isinstance(exc, AgentUnreachable):
        return "its node agent did not answer"
    return exc.detail


async def promote(
    store: MapStore, agents: Agents, shard_name: str, target: str, *, force: bool = False,
    progress: Progress | None = None, fault_hook: FaultHook | None = None,
    catch_up_timeout: float = CATCH_UP_TIMEOUT, owner: str = "boxoffice shard promote",
    lease_ttl: float | None = None,
) -> PromoteReport:
    """Promote `target` (`region` or `region/zone`) of `shard_name` to primary; see the
    module's docstring. Returns the report; raises `PromoteRefused` or `PromoteFailed`."""
    run = _Promotion(store, agents, shard_name, target, force, progress, fault_hook,
                     catch_up_timeout)
    try:
        lease = await Lease.take(store, shard_lock(shard_name), owner, ttl=lease_ttl)
    except ValueError:
        raise PromoteRefused("unknown-shard", f"No shard named {shard_name!r}.") from None
    except LeaseHeld as exc:
        raise PromoteRefused("operation-in-progress",
                             f"Another operation on shard {shard_name} is running now ({exc.holder}); "
                             "if it died, its lease expires within seconds: try again.") from None
    except MapError as exc:
        raise PromoteFailed("map-unavailable", f"Consul did not answer: {exc}") from None
    try:
        return await run.run(lease)
    finally:
        await lease.release()


class _StepDetail:
    text = ""


class _Promotion:
    """The promotion's steps. A planned switchover (failover/switchover.py) runs the same
    machinery under its own journal kind, with its own steps around the commit point
    (`_after_commit`, `_rollback_quietly`)."""

    journal_kind = JOURNAL_KIND

    def __init__(self, store: MapStore, agents: Agents, shard_name: str, target: str, force: bool,
                 progress: Progress | None, fault_hook: FaultHook | None,
                 catch_up_timeout: float) -> None:
        self.journal_name = f"{self.journal_kind}{shard_name}"
        self.store = store
        self.agents = agents
        self.shard_name = shard_name
        self.target = target
        self.force = force
        self.progress = progress
        self.fault_hook = fault_hook
        self.catch_up_timeout = catch_up_timeout
        self.report = PromoteReport(shard=shard_name, target=target, forced=force)
        self.journal: dict[str, Any] | None = None
        self.journal_index = 0
        self.started = time.monotonic()
        # A listed synchronous standby ahead of the candidate, which it streams from first.
        self.catch_up_from: str | None = None
        # The journal of a committed promotion whose target never became writable, which
        # this one overtakes (module docstring).
        self.overtaking: dict[str, Any] | None = None

    # -- plumbing ----------------------------------------------------------------------
    def _emit(self, event: StepEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    @contextlib.asynccontextmanager
    async def _step(self, name: str, begin: str = "") -> AsyncIterator[_StepDetail]:
        self._emit(StepEvent(name, "begin", begin))
        started = time.monotonic()
        detail = _StepDetail()
        yield detail
        seconds = time.monotonic() - started
        self.report.steps.append(StepRecord(name, seconds, detail.text))
        self._emit(StepEvent(name, "ok", detail.text, seconds))
        if self.fault_hook is not None:
            await self.fault_hook(name)

    async def _read_shard(self) -> tuple[Shard, int]:
        try:
            return await self.store.read_shard(self.shard_name)
        except NotFound:
            raise PromoteRefused("unknown-shard", f"No shard named {self.shard_name!r}.") from None
        except MapError as exc:
            raise PromoteFailed("map-unavailable", f"Consul did not answer: {exc}") from None

    async def _regions(self) -> dict[str, Region]:
        """The map's region records (for the order of the new synchronous set)."""
        try:
            return await self.store.read_regions()
        except MapError as exc:
            raise PromoteFailed("map-unavailable", f"Consul did not answer: {exc}") from None

    async def _statuses(self, shard: Shard) -> dict[str, CopyStatus | AgentError]:
        return await copy_statuses(self.agents, shard.members, shard.name)

    async def _write_journal(self, doc: dict[str, Any]) -> None:
        try:
            self.journal_index = await self.store.put_journal(
                self.journal_name, doc, self.journal_index)
        except CasConflict:
            raise PromoteFailed("journal-conflict",
                                "Another runner wrote this promotion's journal meanwhile.") from None
        except MapError as exc:
            raise PromoteFailed("map-unavailable", f"Consul did not answer: {exc}") from None
        self.journal = doc

    async def _delete_journal(self) -> None:
        if self.journal_index:
            await self.store.delete_journal(self.journal_name, self.journal_index)
            self.journal, self.journal_index = None, 0

    # -- the operation -------------------------------------------------------------------
    operation = "promotion"  # in messages

    async def _open(self) -> tuple[Shard, int, str, PromoteReport | None]:
        """Read the shard, resolve the target, and settle a journal an earlier run of this
        operation left: finished past its commit point (its report is the answer),
        rolled back before it, or cleared when the shard moved on without it.
        (shard, its index, the candidate, the finished report or None)."""
        shard, index = await self._read_shard()
        try:
            candidate = shard.resolve_copy(self.target)
        except ValueError as exc:
            raise PromoteRefused("unknown-copy", str(exc)) from None
        report = self.report
        report.target, report.sync_mode = candidate, shard.sync_mode
        try:
            doc, jindex = await self.store.read_journal(self.journal_name)
        except NotFound:
            return shard, index, candidate, None
        except MapError as exc:
            raise PromoteFailed("map-unavailable", f"Consul did not answer: {exc}") from None
        self.journal, self.journal_index = doc, jindex
        if overtakes(shard, doc):
            if doc.get("target") == candidate:
                return shard, index, candidate, await self._resume_finished(shard, doc)
            await self._overtake(shard, doc)  # refused when its target is writable after all
            return shard, index, candidate, None
        # Before its commit point (rolled back, whatever its target: its runner is gone,
        # as this one holds the lease), or stale.
        if shard.primary_copy == doc.get("from") and shard.epoch == doc.get("fromEpoch"):
            await self._resume_rollback(shard, doc)
            report.resumed = "rolled-back"
        else:  # the shard moved on without this journal: it describes nothing now
            await self._resume_stale(shard, doc)
            report.resumed = "stale-journal-cleared"
        shard, index = await self._read_shard()
        overtook = doc.get("overtook")
        if (isinstance(overtook, dict) and self.can_overtake and overtakes(shard, overtook)
                and candidate != shard.primary_copy):
            self.overtaking = overtook  # a rolled-back overtaking: the one it overtook still is
        return shard, index, candidate, None

    can_overtake = True  # a switchover needs a running primary: it never overtakes

    async def _overtake(self, shard: Shard, doc: dict[str, Any]) -> None:
        """Take over from the committed promotion `doc` whose target is not the
        requested candidate, when that target never became writable (else refused)."""
        target = str(doc.get("target"))
        unfinished = (f"An unfinished {self.operation} of {self.shard_name} to {target} (started "
                      f"{doc.get('startedAt')}, committed at epoch {shard.epoch})")
        if not self.can_overtake:
            raise PromoteRefused("operation-in-progress",
                                 f"{unfinished} must be finished first: run it again with --to "
                                 f"{target}, or promote another copy with `shard promote`.", journal=doc)
        try:
            status = await self.agents.copy_status(target, shard.name)
        except AgentError as exc:
            state = _reason(exc)
        else:
            if status.running and status.role == "primary":
                raise PromoteRefused("operation-in-progress",
                                     f"{unfinished} made {target} a running primary: run it again "
                                     f"with --to {target} to finish it first.", journal=doc)
            state = f"it runs as a {status.role}" if status.running and status.role else \
                "its database is not running"
        self.overtaking = doc
        self.report.resumed = "overtaken"
        self.report.notes.append(f"{unfinished} never made {target} writable ({state}): overtaken "
                                 f"at epoch {shard.epoch + 1}")

    async def _resume_finished(self, shard: Shard, doc: dict[str, Any]) -> PromoteReport:
        self.report.resumed = "finished"
        return await self._finish(shard, doc)

    async def _resume_rollback(self, shard: Shard, doc: dict[str, Any]) -> None:
        await self._rollback(shard, doc)

    async def _resume_stale(self, shard: Shard, doc: dict[str, Any]) -> None:
        await self._delete_journal()

    async def run(self, lease: Lease) -> PromoteReport:
        self.agents = under_lease(self.agents, lease)  # steps carry its sequencer
        shard, index, candidate, finished = await self._open()
        if finished is not None:
            return finished
        report = self.report

        if candidate == shard.primary_copy:
            return await self._already_primary(shard, candidate)

        statuses = await self._check(shard, candidate)
        mode, new_set = next_sync_set(shard, candidate, await self._regions())
        report.old_primary, report.old_epoch = shard.primary_copy, shard.epoch
        report.new_primary, report.new_epoch = candidate, shard.epoch + 1
        report.sync_standbys = new_set
        try:
            await self._write_journal({
                "op": "promote", "shard": shard.name, "target": candidate,
                "from": shard.primary_copy, "fromEpoch": shard.epoch, "newEpoch": shard.epoch + 1,
                "force": self.force, "phase": "prepared", "startedAt": _now(),
                "syncStandbys": new_set, "fromSyncStandbys": list(shard.sync_standbys),
                "repointed": [],
                **({"overtook": {k: v for k, v in self.overtaking.items() if k != "overtook"}}
                   if self.overtaking is not None else {}),
            })
        except PromoteFailed as exc:
            if exc.kind == "journal-conflict":
                raise PromoteRefused("operation-in-progress", exc.detail) from None
            raise

        try:
            epoch_lsn = await self._catch_up(shard, candidate)
            await self._set_sync(shard, candidate, mode, new_set, statuses)
            await self._repoint(shard, candidate, statuses, epoch_lsn)
            if not await lease.confirm():  # renewed now, right before the commit point
                raise PromoteFailed("lease-lost", "This runner's lease on the shard could not be "
                                    "confirmed (it expired, or Consul did not answer).")
        except PromoteError:
            await self._rollback_quietly(shard)
            raise
        committed = await self._commit(shard, index, candidate, epoch_lsn, new_set)
        return await self._finish(committed, self.journal or {})

    # -- 1. check ------------------------------------------------------------------------
    async def _check(self, shard: Shard, candidate: str) -> dict[str, CopyStatus | AgentError]:
        report = self.report
        async with self._step("check", f"{shard.name}: {candidate} to replace {shard.primary_copy}") as step:
            statuses = await self._statuses(shard)
            cand = statuses[candidate]
            if isinstance(cand, AgentRefused):
                raise PromoteRefused("candidate-unknown", f"{candidate}: {cand.detail}")
            if isinstance(cand, AgentError):
                raise PromoteFailed("candidate-unreachable",
                                    f"The candidate {candidate} cannot be reached: {cand.detail}")
            if not cand.running or cand.role is None:
                raise PromoteRefused("candidate-not-running",
                                     f"The candidate {candidate}'s database is not running or not "
                                     "answering yet; its node agent starts it: try again.")
            if cand.role == "primary":
                raise PromoteRefused("candidate-is-primary",
                                     f"The candidate {candidate} already runs as a primary although "
                                     f"the map names {shard.primary_copy}: not promoting over it.")
            for key, status in statuses.items():
                report.positions[key] = status.position_lsn if isinstance(status, CopyStatus) else None
            epoch = int(self.overtaking.get("fromEpoch") or shard.epoch) if self.overtaking else shard.epoch
            timelines = effective_timelines(statuses, epoch)
            here = (timelines[candidate], cand.position or 0)
            ahead: dict[str, dict[str, Any]] = {}
            not_heard: dict[str, str] = {}
            for key, status in statuses.items():
                if key == candidate:
                    continue
                if isinstance(status, AgentError):
                    not_heard[key] = _reason(status)
                elif status.role is None or status.position is None:
                    not_heard[key] = "its database is not running"
                elif (timelines[key], status.position) > here:
                    ahead[key] = {"role": status.role, "timeline": status.timeline,
                                  "position": status.position_lsn,
                                  "bytesAhead": status.position - (cand.position or 0)}
            listed, problems = self._set_to_check(shard, candidate, statuses)
            in_set = candidate in listed
            if not in_set:
                problems.append(f"{candidate} is not in the synchronous standby set "
                                f"({', '.join(listed) or 'empty'}): a confirmed "
                                "booking may be missing from it")
            elif len(listed) > 1:  # a quorum: the commit is on one of them
                for key in listed:
                    if key in not_heard:
                        problems.append(f"synchronous standby {key} not heard from "
                                        f"({not_heard[key]}): it may hold confirmed bookings "
                                        f"{candidate} lacks")
                    elif key in ahead and timelines[key] != timelines[candidate]:
                        problems.append(f"synchronous standby {key} is ahead of {candidate} "
                                        f"on another timeline ({ahead[key]['position']})")
                listed_ahead = [k for k in listed if k in ahead]
                if not problems and listed_ahead:
                    # Every listed standby answered and the candidate is behind some: they
                    # may hold commits confirmed while the candidate was not the first
                    # connected one (FIRST 1), or on their own (ANY 1); or only WAL whose
                    # commit was never confirmed. Either way nothing is lost if the
                    # candidate first streams the rest from the most advanced of them.
                    self.catch_up_from = max(listed_ahead, key=lambda k: statuses[k].position or 0)  # type: ignore[union-attr]
            if problems and not self.force:
                kind = "not-in-sync-set" if not in_set else "not-most-recent"
                raise PromoteRefused(kind, "; ".join(problems) + ". Use --force to promote anyway "
                                     "(what may be lost is reported).", problems=problems)
            if self.force:
                report.lost = {"notInSyncSet": not in_set, "candidatePosition": cand.position_lsn,
                               "ahead": ahead, "notHeardFrom": not_heard, "problems": problems}
            step.text = (f"{candidate} at {cand.position_lsn} (timeline {cand.timeline}), "
                         f"{'in' if in_set else 'NOT in'} the synchronous set"
                         + (f"; {self.catch_up_from} is ahead: the candidate catches up from it"
                            if self.catch_up_from else ""))
            return statuses

    def _set_to_check(self, shard: Shard, candidate: str, statuses: dict[str, CopyStatus | AgentError]
                      ) -> tuple[tuple[str, ...], list[str]]:
        """(the synchronous set the candidate is checked against, problems of its own):
        the shard's; when overtaking a promotion whose target never became writable, the
        set from before it (module docstring)."""
        doc = self.overtaking
        if doc is None:
            return shard.sync_standbys, []
        dead, old = str(doc.get("target")), str(doc.get("from", ""))
        new_epoch = int(doc.get("newEpoch") or shard.epoch)
        problems = [f"{k} not heard from: it may hold bookings {dead} confirmed under epoch {new_epoch}"
                    for k in shard.sync_standbys if k != candidate and not _heard(statuses.get(k))]
        wrote = sorted(k for k, s in statuses.items()
                       if isinstance(s, CopyStatus) and (s.epoch or 0) >= new_epoch)
        if wrote:
            self.report.notes.append(f"{', '.join(wrote)} hold the epoch row {new_epoch}: {dead} "
                                     "was promoted after all, so its own synchronous set applies")
            return shard.sync_standbys, problems
        listed = [k for k in before_sync_set(shard, doc) if k != dead]
        listed.append(old if old in shard.members and _heard(statuses.get(old)) else dead)
        return tuple(dict.fromkeys(listed)), problems

    # -- 2. catch-up ---------------------------------------------------------------------
    async def _catch_up(self, shard: Shard, candidate: str) -> str:
        source = self.catch_up_from
        begin = (f"{candidate} streams the rest from {source}, then replays it" if source
                 else f"{candidate} replays what it received")
        async with self._step("catch-up", begin) as step:
            deadline = time.monotonic() + self.catch_up_timeout
            last: CopyStatus | None = None
            needed = 0
            if source is not None:
                try:  # where the source is now, then follow it (cascading) until reached
                    needed = (await self.agents.copy_status(source, shard.name)).position or 0
                    await self.agents.repoint(candidate, shard.name, shard.members[source].db_address)
                except AgentError as exc:
                    raise PromoteFailed("catch-up-source-unreachable",
                                        f"{source} could not be followed: {exc.detail}") from None
            while True:
                try:
                    last = await self.agents.copy_status(candidate, shard.name)
                except AgentError as exc:
                    if time.monotonic() > deadline:
                        raise PromoteFailed("candidate-unreachable", str(exc)) from None
                else:
                    if (last.role == "standby" and last.replayed_all and last.replay_lsn
                            and (last.position or 0) >= needed):
                        step.text = f"replayed to {last.replay_lsn}"
                        self.report.epoch_lsn = last.replay_lsn
                        return last.replay_lsn
                    if last.role == "primary":
                        raise PromoteRefused("candidate-is-primary",
                                             f"{candidate} became a primary meanwhile.")
                if time.monotonic() > deadline:
                    where = f"received {last.receive_lsn}, replayed {last.replay_lsn}" if last else "?"
                    raise PromoteFailed("catch-up-timeout",
                                        f"{candidate} did not replay what it received within "
                                        f"{self.catch_up_timeout:.0f}s ({where}).")
                await asyncio.sleep(CATCH_UP_POLL)  # poll interval of a bounded wait

    # -- 3. sync-set ---------------------------------------------------------------------
    async def _set_sync(self, shard: Shard, candidate: str, mode: str, keys: list[str],
                        statuses: dict[str, CopyStatus | AgentError]) -> None:
        names = []
        for key in keys:
            status = statuses.get(key)
            name = status.name if isinstance(status, CopyStatus) and status.name else ""
            names.append(name or application_name(shard.name, key))
        async with self._step("sync-set", f"{candidate}: {mode} {keys or 'none'}") as step:
            try:
                value = await self.agents.set_sync(candidate, shard.name, names, mode)
            except AgentError as exc:
                raise PromoteFailed("sync-set-failed", f"Setting {candidate}'s synchronous "
                                    f"standby set failed: {exc.detail}") from None
            self.report.synchronous_standby_names = value
            if mode != shard.sync_mode:
                missing = (f"second copy in {shard.members[candidate].region}"
                           if shard.sync_mode == "zone" else "copy in another region")
                self.report.notes.append(f"sync {shard.sync_mode}: no {missing}, so the set is "
                                         f"{value or 'empty (asynchronous)'}")
            step.text = f"synchronous_standby_names = {value!r}" if value else "asynchronous (no set)"

    # -- 4. repoint ----------------------------------------------------------------------
    async def _repoint(self, shard: Shard, candidate: str,
                       statuses: dict[str, CopyStatus | AgentError], epoch_lsn: str) -> None:
        report = self.report
        address = shard.members[candidate].db_address
        targets = []
        for key, status in statuses.items():
            if key == candidate:
                continue
            following = isinstance(status, CopyStatus) and status.role == "standby"
            if key == shard.primary_copy and not following:
                continue  # the old primary: its node agent rewinds it once the map moves on
            targets.append(key)
        begin = f"{', '.join(targets) or 'no other standby'} -> {candidate}"
        async with self._step("repoint", begin) as step:
            # Journalled first: a runner that dies half-way is rolled back for all of them
            # (pointing back a standby that was never moved changes nothing).
            assert self.journal is not None
            await self._write_journal({**self.journal, "epochLsn": epoch_lsn, "repointed": targets})
            results = await asyncio.gather(
                *(self.agents.repoint(k, shard.name, address) for k in targets), return_exceptions=True)
            for key, result in zip(targets, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, AgentError):
                        raise result
                    report.not_repointed[key] = _reason(result)
                else:
                    report.repointed.append(key)
            if report.not_repointed:
                report.notes.append(
                    "not repointed: " + ", ".join(f"{k} ({why})" for k, why in report.not_repointed.items())
                    + "; its node agent points it at the map's primary once it streams no more")
            step.text = (f"{len(report.repointed)} repointed"
                         + (f", {len(report.not_repointed)} not reached" if report.not_repointed else ""))

    # -- 5. commit -----------------------------------------------------------------------
    async def _commit(self, shard: Shard, index: int, candidate: str, epoch_lsn: str,
                      new_set: list[str]) -> Shard:
        new = shard.promoted(candidate, epoch_lsn, new_set)
        async with self._step("commit", f"map: {candidate} primary at epoch {new.epoch}") as step:
            try:
                await self.store.put_shard(new, index)
            except (CasConflict, EpochRuleViolation) as exc:
                await self._rollback_quietly(shard)
                raise PromoteRefused("map-changed",
                                     f"The shard record changed since it was read ({exc}); "
                                     "nothing was promoted. Look at the map and try again.") from None
            except MapError as exc:
                # The write may or may not have been applied: the journal stays, and running
                # the command again reads the map and finishes or rolls back.
                raise PromoteFailed("commit-unknown",
                                    f"Consul did not confirm the map write ({exc}): run the command "
                                    "again to finish or roll back.") from None
            assert self.journal is not None
            try:
                await self._write_journal({**self.journal, "phase": "committed"})
            except PromoteFailed as exc:  # the map is the truth; the journal only helps
                log.warning("journal not updated after the commit", extra={"error": exc.detail})
            step.text = f"epoch {shard.epoch} -> {new.epoch}, epoch LSN {epoch_lsn}"
        return new

    # -- 6. promote ----------------------------------------------------------------------
    async def _finish(self, shard: Shard, doc: dict[str, Any]) -> PromoteReport:
        report = self.report
        candidate = shard.primary_copy
        report.outcome = report.outcome or ("finished" if report.resumed == "finished" else "promoted")
        report.old_primary = report.old_primary or str(doc.get("from", ""))
        report.old_epoch = report.old_epoch or int(doc.get("fromEpoch", shard.epoch - 1))
        report.new_primary, report.new_epoch = candidate, shard.epoch
        report.epoch_lsn = shard.epoch_lsn
        report.sync_standbys = list(shard.sync_standbys)
        await self._after_commit(shard, doc)
        try:
            await self._delete_journal()
        except MapError as exc:
            report.notes.append(f"the finished journal was not removed ({exc}); the next run clears it")
        report.old_primary_next = await self._old_primary_next(shard, report.old_primary)
        report.seconds = time.monotonic() - self.started
        return report

    async def _after_commit(self, shard: Shard, doc: dict[str, Any]) -> None:
        """What remains once the map names the candidate, before the journal is removed:
        its promotion."""
        await self._promote_candidate(shard)

    async def _promote_candidate(self, shard: Shard) -> None:
        candidate = shard.primary_copy
        begin = f"{candidate}: pg_promote, then the epoch row {shard.epoch}"
        async with self._step("promote", begin) as step:
            try:
                result = await self.agents.promote(candidate, shard.name, shard.epoch)
            except AgentError as exc:
                raise PromoteFailed(
                    "promote-failed",
                    f"The map names {candidate} primary at epoch {shard.epoch}, but its promotion "
                    f"failed ({exc.detail}): run the command again to finish it.", committed=True) from None
            step.text = ("promoted" if result.get("promoted") else "already a primary") + \
                f", epoch row {result.get('epoch', shard.epoch)}" + \
                (f" (pg_promote {result['promoteSeconds']} s, epoch row {result['epochSeconds']} s)"
                 if "promoteSeconds" in result and "epochSeconds" in result else "")

    async def _already_primary(self, shard: Shard, candidate: str) -> PromoteReport:
        """The map names the target primary already: make sure it runs as one, with the
        map's epoch in its epoch row (idempotent)."""
        self.report.outcome = "already-primary"
        self.report.old_primary = candidate
        self.report.old_epoch = shard.epoch
        report = await self._finish(shard, {"from": candidate, "fromEpoch": shard.epoch})
        report.old_primary_next = "nothing: it is the primary"
        return report

    async def _old_primary_next(self, shard: Shard, old: str) -> str:
        if not old or old == shard.primary_copy or old not in shard.members:
            return ""
        new = shard.primary_copy
        try:
            status = await self.agents.copy_status(old, shard.name)
        except AgentError:
            return (f"its node agent did not answer; when it does, it starts {old} as a standby "
                    f"of {new}, rewound if its history diverged (the map no longer names it)")
        if status.running and status.role == "primary":
            return (f"still running as a primary (epoch row {status.epoch}): its node agent "
                    f"demotes it (the map's epoch {shard.epoch} is higher), rewinds it and starts "
                    f"it as a standby of {new}")
        if status.running and status.role == "standby":
            return f"running as a standby; its node agent makes it follow {new}, rewound if diverged"
        return (f"not running: its node agent starts it as a standby of {new}, rewound with "
                "pg_rewind if its history diverged")

    # -- rolling back (before the commit point) -----------------------------------------------
    async def _rollback(self, shard: Shard, doc: dict[str, Any]) -> None:
        async with self._step("rollback", f"unfinished promotion to {doc.get('target')}") as step:
            step.text = await self._undo_repoints(shard, list(doc.get("repointed") or []))
            await self._delete_journal()
            self.report.notes.append(f"an unfinished promotion (before its commit point) was rolled "
                                     f"back: {step.text}")

    async def _rollback_quietly(self, shard: Shard) -> None:
        """Undo a failed attempt before the commit point; a failure to undo leaves the
        journal, and the next run rolls back again."""
        try:
            await self._undo_repoints(shard, list(self.report.repointed))
            await self._delete_journal()
        except (MapError, AgentError) as exc:
            log.warning("rollback incomplete; the journal stays", extra={"error": str(exc)})

    async def _undo_repoints(self, shard: Shard, repointed: list[str]) -> str:
        if not repointed:
            return "nothing was repointed"
        old = shard.primary_copy
        try:
            status = await self.agents.copy_status(old, shard.name)
            serving = status.running and status.role == "primary"
        except AgentError:
            serving = False
        if not serving:
            return (f"{', '.join(repointed)} stay on the candidate (the old primary does not answer "
                    "as a primary): harmless, a cascading standby receives the same WAL")
        back = await asyncio.gather(
            *(self.agents.repoint(k, shard.name, shard.primary.db_address) for k in repointed),
            return_exceptions=True)
        failed = [k for k, r in zip(repointed, back, strict=True) if isinstance(r, BaseException)]
        done = [k for k in repointed if k not in failed]
        return (f"{', '.join(done) or 'none'} pointed back at {old}"
                + (f"; {', '.join(failed)} stay on the candidate" if failed else ""))
