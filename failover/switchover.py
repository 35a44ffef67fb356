"""Planned switchover of a shard's primary: `switchover(store, agents, shard, target)`.

The operator's `boxoffice shard switchover` and `POST /admin/shards/{shard}/switchover`
run it; it shares the promotion's machinery (failover/promote.py: lease, journal,
steps, the commit) and adds what a planned change can do that an emergency one cannot:
stop the old primary cleanly, so that the target holds every byte of its WAL, while the
gateways hold the shard's writes. In order:

1. check: the record and its index; the target (`resolve_copy`) must be a running
   standby, streaming, in the synchronous standby set; the old primary must be running
   as the primary (a dead primary is `shard promote`'s case).
2. sync-set: the target's synchronous standby set for after the switch (`next_sync_set`),
   set while it is a standby.
3. repoint: the other standbys follow the target (cascading until the promotion).
4. hold: check-and-set of the record with a transition (`Shard.transition`, same
   primary and epoch). From here the gateways hold the shard's writes
   (gateway/ride_through.py) instead of sending them to a primary about to stop.
5. stop: the old primary's position is read and its agent stops it (fast shutdown:
   Postgres sends all its WAL, the shutdown checkpoint included, to the connected
   standbys before it exits; bookings caught in flight are answered 503 and retried by
   the gateways under their keys).
6. drain: the target has replayed all it received, and received at least the old
   primary's last position (bounded: `drain_timeout`).
7. commit: check-and-set of the record: the target is primary, epoch + 1, the epoch LSN
   and the new set, the transition cleared. THE COMMIT POINT, and the map change that
   releases the held writes: gateways send them to the target, which answers
   `not-primary` until step 8 has promoted it (they retry within milliseconds).
8. promote and restart-old, at once: the target's agent runs pg_promote and writes the
   epoch row; the old primary's agent starts it in its map role, a standby of the new
   primary (rewound if its history diverged, which a clean shutdown avoids).

A failure before the commit point rolls back: the transition is cleared first (the held
writes go back to the old primary, still the map's primary: while it starts again they
are answered 503 and retried by the gateways), then the old primary is started again
and the repointed standbys pointed back. When the old primary's node agent does not
answer (its host was lost between the check and the commit) nothing is started: the
rollback ends there, the journal stays, and the shard is a shard whose primary is down,
which the failover controller fails over (its promotion supersedes the switchover; the
journal is tidied, and the old primary started as a standby, once its host answers).
Every agent call is bounded (failover/agents.py timeouts; the controller's are shorter),
so no runner holds the shard's lease for long on a frozen host. Shown by
tests/test_controller.py
`test_a_switchover_whose_old_primary_host_is_lost_clears_its_transition_and_fails_over`.
A runner that dies leaves its journal (`switchover-<shard>`); running the switchover
again (or `resume_switchover`) finishes it when the map already names the target at
the journal's epoch, else rolls it back. The transition names its runner (`owner`);
how old it is, is for each observer to measure on its own clock (region_map/model.py
`Transition`).
The writes are held from step 4 until the target is promoted in step 8; the report
gives that time (`writesHeldSeconds`), the goal is under 0.5 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Protocol

from common.lsn import optional_lsn_to_int
from failover.agents import AgentError, Agents, CopyStatus, under_lease
from failover.lease import Lease, LeaseHeld, shard_lock
from failover.promote import (
    FaultHook,
    Progress,
    PromoteError,
    PromoteFailed,
    PromoteRefused,
    PromoteReport,
    _now,
    _Promotion,
    _reason,
    host_lost,
    next_sync_set,
)
from region_map import CasConflict, EpochRuleViolation, MapError, MapStore, NotFound, Shard
from region_map.model import Transition

log = logging.getLogger("boxoffice.failover")

JOURNAL_KIND = "switchover-"
DRAIN_TIMEOUT = 5.0  # seconds for the target to replay the old primary's last WAL
DRAIN_POLL = 0.01


def journal_id(shard: str) -> str:
    return f"{JOURNAL_KIND}{shard}"


class SwitchoverAgents(Agents, Protocol):
    """The promotion's primitives, and stopping / starting a copy (`NodeAgents`)."""

    async def stop(self, host: str, shard: str) -> None: ...

    async def start(self, host: str, shard: str) -> None: ...


@dataclass
class SwitchoverReport(PromoteReport):
    """A promotion's report, plus how long the gateways held the shard's writes (from the
    transition to the target's promotion) and what became of the old primary."""

    writes_held_seconds: float | None = None
    old_primary_restarted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"kind": "switchover", **super().to_json(),
                "writesHeldSeconds": None if self.writes_held_seconds is None
                else round(self.writes_held_seconds, 4),
                "oldPrimaryRestarted": self.old_primary_restarted}


async def switchover(
    store: MapStore, agents: SwitchoverAgents, shard_name: str, target: str, *,
    progress: Progress | None = None, fault_hook: FaultHook | None = None,
    drain_timeout: float = DRAIN_TIMEOUT, owner: str = "boxoffice shard switchover",
    lease_ttl: float | None = None,
) -> SwitchoverReport:
    """Make `target` (`region` or `region/zone`) the primary of `shard_name` by a planned
    switchover; see the module's docstring. Raises `PromoteRefused` (nothing changed, or
    rolled back) or `PromoteFailed` (run it again: it finishes or rolls back)."""
    run = _Switchover(store, agents, shard_name, target, progress, fault_hook, drain_timeout,
                      owner=f"{owner} (pid {os.getpid()} on {socket.gethostname()})")
    return await _leased(store, shard_name, owner, lease_ttl, run.run)


async def resume_switchover(store: MapStore, agents: SwitchoverAgents, shard_name: str, *,
                            owner: str = "switchover resume",
                            lease_ttl: float | None = None) -> SwitchoverReport | None:
    """Finish or roll back an unfinished switchover of `shard_name` from its journal (a
    runner died): None when there is none. For a controller that finds the journal."""
    try:
        doc, _ = await store.read_journal(journal_id(shard_name))
    except NotFound:
        return None
    run = _Switchover(store, agents, shard_name, str(doc.get("target", "")), None, None,
                      DRAIN_TIMEOUT, resume_only=True)
    return await _leased(store, shard_name, owner, lease_ttl, run.run)


async def _leased(store: MapStore, shard_name: str, owner: str, ttl: float | None,
                  body: Any) -> SwitchoverReport:
    try:
        lease = await Lease.take(store, shard_lock(shard_name), owner, ttl=ttl)
    except ValueError:
        raise PromoteRefused("unknown-shard", f"No shard named {shard_name!r}.") from None
    except LeaseHeld as exc:
        raise PromoteRefused("operation-in-progress",
                             f"Another operation on shard {shard_name} is running now ({exc.holder}); "
                             "if it died, its lease expires within seconds: try again.") from None
    except MapError as exc:
        raise PromoteFailed("map-unavailable", f"Consul did not answer: {exc}") from None
    try:
        report: SwitchoverReport = await body(lease)
        return report
    finally:
        await lease.release()


class _Switchover(_Promotion):
    journal_kind = JOURNAL_KIND

    def __init__(self, store: MapStore, agents: SwitchoverAgents, shard_name: str, target: str,
                 progress: Progress | None, fault_hook: FaultHook | None, drain_timeout: float,
                 resume_only: bool = False, owner: str = "") -> None:
        super().__init__(store, agents, shard_name, target, False, progress, fault_hook, 0.0)
        self.agents: SwitchoverAgents = agents
        self.report: SwitchoverReport = SwitchoverReport(shard=shard_name, target=target)
        self.drain_timeout = drain_timeout
        self.resume_only = resume_only
        self.held_since: float | None = None  # monotonic time of the transition's write
        self.owner = owner  # written in the transition

    can_overtake = False  # a switchover needs a running primary

    # -- the operation -------------------------------------------------------------------
    operation = "switchover"

    async def _resume_finished(self, shard: Shard, doc: dict[str, Any]) -> PromoteReport:
        self.report.resumed, self.report.outcome = "finished", "finished"
        return await self._finish(shard, doc)

    async def _resume_rollback(self, shard: Shard, doc: dict[str, Any]) -> None:
        await self._roll_back(shard, doc, "an unfinished switchover")

    async def _resume_stale(self, shard: Shard, doc: dict[str, Any]) -> None:
        # the shard moved on without this journal (a promotion): tidy up after it
        await self._start_old(shard, str(doc.get("from", "")))
        await self._delete_journal()

    async def run(self, lease: Lease) -> SwitchoverReport:  # type: ignore[override]
        self.agents = under_lease(self.agents, lease)  # steps carry its sequencer
        shard, index, candidate, finished = await self._open()
        if finished is not None:
            return finished  # type: ignore[return-value]
        report = self.report
        if self.resume_only:
            report.outcome = report.outcome or "resumed"
            report.seconds = time.monotonic() - self.started
            return report

        if shard.transition is not None:  # left by a runner whose journal is gone
            shard, index = await self._set_transition(shard, index, None)
            report.notes.append("a transition without a journal was cleared")
        if candidate == shard.primary_copy:
            return await self._already_primary(shard, candidate)  # type: ignore[return-value]

        statuses = await self._check_switchover(shard, candidate)
        mode, new_set = next_sync_set(shard, candidate, await self._regions())
        report.old_primary, report.old_epoch = shard.primary_copy, shard.epoch
        report.new_primary, report.new_epoch = candidate, shard.epoch + 1
        report.sync_standbys = new_set
        try:
            await self._write_journal({
                "op": "switchover", "shard": shard.name, "target": candidate,
                "from": shard.primary_copy, "fromEpoch": shard.epoch, "newEpoch": shard.epoch + 1,
                "phase": "prepared", "startedAt": _now(), "syncStandbys": new_set, "repointed": [],
            })
        except PromoteFailed as exc:
            if exc.kind == "journal-conflict":
                raise PromoteRefused("operation-in-progress", exc.detail) from None
            raise

        try:
            await self._set_sync(shard, candidate, mode, new_set, statuses)
            await self._repoint(shard, candidate, statuses, None)  # type: ignore[arg-type]
            held, final = await asyncio.gather(  # both finish before anything is rolled back
                self._hold(shard, index, candidate), self._old_position(shard), return_exceptions=True)
            for result in (held, final):
                if isinstance(result, BaseException):
                    raise result
            assert not isinstance(held, BaseException) and isinstance(final, int)
            shard, index = held
            await self._stop_old(shard)
            epoch_lsn = await self._drain(shard, candidate, final)
            if not await lease.confirm():  # renewed now, right before the commit point
                raise PromoteFailed("lease-lost", "This runner's lease on the shard could not be "
                                    "confirmed (it expired, or Consul did not answer).")
        except PromoteError:
            await self._rollback_quietly(shard)
            raise
        except BaseException:  # cancelled or a defect: leave the journal, a rerun rolls back
            log.exception("switchover interrupted before its commit point; the journal stays")
            raise
        committed = await self._commit(shard, index, candidate, epoch_lsn, new_set)
        report.outcome = "switched-over"
        return await self._finish(committed, self.journal or {})  # type: ignore[return-value]

    # -- 1. check ------------------------------------------------------------------------
    async def _check_switchover(self, shard: Shard, candidate: str) -> dict[str, CopyStatus | AgentError]:
        report = self.report
        old = shard.primary_copy
        async with self._step("check", f"{shard.name}: {candidate} to replace {old}") as step:
            statuses = await self._statuses(shard)
            for key, status in statuses.items():
                report.positions[key] = status.position_lsn if isinstance(status, CopyStatus) else None
            cand, primary = statuses[candidate], statuses[old]
            if candidate not in shard.sync_standbys:
                raise PromoteRefused("not-in-sync-set",
                                     f"{candidate} is not in the synchronous standby set "
                                     f"({', '.join(shard.sync_standbys) or 'empty'}): a switchover "
                                     "goes to a synchronous standby only.")
            if isinstance(cand, AgentError):
                raise PromoteFailed("candidate-unreachable",
                                    f"The target {candidate} cannot be reached: {_reason(cand)}")
            if not cand.running or cand.role != "standby":
                raise PromoteRefused("candidate-not-ready",
                                     f"The target {candidate} is not running as a standby "
                                     f"({cand.role or 'not answering'}).")
            if not cand.streaming:
                raise PromoteRefused("candidate-not-streaming",
                                     f"The target {candidate} is not streaming from {old} now: "
                                     "it could miss the primary's last WAL. Try again once it is.")
            if isinstance(primary, AgentError) or not primary.running or primary.role != "primary":
                why = _reason(primary) if isinstance(primary, AgentError) else \
                    f"it runs as {primary.role or 'nothing'}"
                raise PromoteRefused("primary-not-running",
                                     f"The primary {old} is not running as a primary ({why}): a "
                                     "switchover needs it; use `shard promote` for a dead primary.")
            step.text = (f"{candidate} streaming at {cand.position_lsn}, in the synchronous set; "
                         f"{old} primary at {primary.position_lsn}")
            return statuses

    # -- 4. hold -------------------------------------------------------------------------
    async def _set_transition(self, shard: Shard, index: int,
                              transition: Transition | None) -> tuple[Shard, int]:
        """Write the record with (or without) a transition by check-and-set on `index`;
        the record as stored and its new index."""
        wanted = shard.with_transition(transition)
        try:
            await self.store.put_shard(wanted, index)
            stored, new_index = await self.store.read_shard(shard.name)
        except (CasConflict, EpochRuleViolation) as exc:
            raise PromoteRefused("map-changed", f"The shard record changed since it was read ({exc}); "
                                 "look at the map and try again.") from None
        except MapError as exc:
            raise PromoteFailed("map-unavailable", f"Consul did not answer: {exc}") from None
        if stored != wanted:
            raise PromoteRefused("map-changed", "The shard record changed right after it was written.")
        return stored, new_index

    async def _hold(self, shard: Shard, index: int, candidate: str) -> tuple[Shard, int]:
        async with self._step("hold", "map: transition (gateways hold the shard's writes)") as step:
            assert self.journal is not None
            await self._write_journal({**self.journal, "phase": "holding"})
            transition = Transition.begin("switchover", candidate, shard.epoch, owner=self.owner)
            held, index = await self._set_transition(shard, index, transition)
            self.held_since = time.monotonic()
            step.text = f"switchover to {candidate} since {transition.since}"
        return held, index

    # -- 5. stop -------------------------------------------------------------------------
    async def _old_position(self, shard: Shard) -> int:
        """The old primary's flushed position, read as the transition is written: its WAL
        ends there or later (at its shutdown checkpoint), so the target must hold at least
        that much once the old primary has stopped."""
        try:
            status = await self.agents.copy_status(shard.primary_copy, shard.name)
        except AgentError as exc:
            raise PromoteFailed("primary-unreachable", f"{shard.primary_copy}: {exc.detail}") from None
        if status.role != "primary" or status.position is None:
            raise PromoteRefused("primary-not-running", f"{shard.primary_copy} stopped being the primary.")
        self.report.notes.append(f"{shard.primary_copy} was at {status.position_lsn} when the writes "
                                 "were held")
        return status.position

    async def _stop_old(self, shard: Shard) -> None:
        old = shard.primary_copy
        async with self._step("stop", f"{old}: fast shutdown") as step:
            try:
                await self.agents.stop(old, shard.name)
            except AgentError as exc:
                raise PromoteFailed("stop-failed", f"Stopping {old} failed: {exc.detail}") from None
            step.text = "stopped (its WAL sent to the connected standbys first)"

    # -- 6. drain ------------------------------------------------------------------------
    async def _drain(self, shard: Shard, candidate: str, final: int) -> str:
        async with self._step("drain", f"{candidate} replays the old primary's last WAL") as step:
            deadline = time.monotonic() + self.drain_timeout
            last: CopyStatus | None = None
            while True:
                try:
                    last = await self.agents.copy_status(candidate, shard.name)
                except AgentError as exc:
                    if time.monotonic() > deadline:
                        raise PromoteFailed("candidate-unreachable", exc.detail) from None
                else:
                    received = optional_lsn_to_int(last.receive_lsn)
                    if (last.role == "standby" and last.replayed_all and last.replay_lsn
                            and (received or 0) >= final):
                        step.text = f"received and replayed to {last.replay_lsn}"
                        self.report.epoch_lsn = last.replay_lsn
                        return last.replay_lsn
                if time.monotonic() > deadline:
                    where = f"received {last.receive_lsn}, replayed {last.replay_lsn}" if last else "?"
                    raise PromoteFailed("drain-timeout",
                                        f"{candidate} did not receive and replay the old primary's "
                                        f"last WAL within {self.drain_timeout:.1f}s ({where}).")
                await asyncio.sleep(DRAIN_POLL)  # poll interval of a bounded wait

    # -- 8. promote and restart the old primary --------------------------------------------
    async def _after_commit(self, shard: Shard, doc: dict[str, Any]) -> None:
        old = str(doc.get("from", ""))
        if not old or old == shard.primary_copy:  # nothing was switched (already the primary)
            await self._promote_candidate(shard)
            return
        promoted, restarted = await asyncio.gather(
            self._promote_and_release(shard), self._start_old(shard, old), return_exceptions=True)
        for result in (promoted, restarted):
            if isinstance(result, BaseException):
                raise result

    async def _promote_and_release(self, shard: Shard) -> None:
        await self._promote_candidate(shard)
        if self.held_since is not None:  # the held writes can commit from here
            self.report.writes_held_seconds = time.monotonic() - self.held_since

    async def _start_old(self, shard: Shard, old: str) -> None:
        """Start the old primary in its map role (idempotent: a running copy is left as it
        is, and no longer kept down); after the commit that is a standby of the new
        primary, before it the primary again."""
        if old not in shard.members:
            return
        role = "the primary" if old == shard.primary_copy else f"a standby of {shard.primary_copy}"
        async with self._step("restart-old", f"{old}: start as {role}") as step:
            try:
                await self.agents.start(old, shard.name)
            except AgentError as exc:
                raise PromoteFailed("restart-failed",
                                    f"Starting {old} again failed ({exc.detail}): run the command "
                                    "again to finish.", committed=old != shard.primary_copy) from None
            self.report.old_primary_restarted = True
            step.text = f"running as {role}"

    # -- rolling back (before the commit point) -----------------------------------------------
    async def _rollback_quietly(self, shard: Shard) -> None:
        """Undo a failed attempt before the commit point: clear the transition, start the
        old primary, point the standbys back. A failure to undo leaves the journal, and
        the next run rolls back again."""
        try:
            await self._roll_back(shard, self.journal or {}, "this switchover")
        except (PromoteError, MapError, AgentError) as exc:
            log.warning("rollback incomplete; the journal stays", extra={"error": str(exc)})

    async def _roll_back(self, shard: Shard, doc: dict[str, Any], what: str) -> None:
        async with self._step("rollback", f"{what} (before its commit point)") as step:
            current, index = await self._read_shard()
            if current.primary_copy != shard.primary_copy or current.epoch != shard.epoch:
                raise PromoteFailed("map-changed", "The map moved on during the rollback.")
            if current.transition is not None:  # first: the writes are held no longer
                current, index = await self._set_transition(current, index, None)
            old = current.primary_copy
            try:
                await self.agents.copy_status(old, current.name)
            except AgentError as exc:
                if host_lost(exc):  # (an agent that answers, even with an error, can start it)
                    self.report.notes.append(f"{what}: transition cleared; {old} not started "
                                             f"again ({_reason(exc)}): the journal stays")
                    raise PromoteFailed(
                        "old-primary-unreachable",
                        f"The transition is cleared, but {old} cannot be started again "
                        f"({_reason(exc)}): its host looks lost. The failover controller fails "
                        "the shard over; once the host answers, running the switchover again "
                        "tidies up.") from None
            await self._start_old(current, old)
            undone = await self._undo_repoints(current, list(doc.get("repointed") or self.report.repointed))
            await self._delete_journal()
            step.text = f"{current.primary_copy} primary again, transition cleared; {undone}"
            self.report.notes.append(f"{what} was rolled back: {step.text}")
