"""Moving an event to another shard while it is on sale: `move_event(store, admin, event, shard)`.

`boxoffice event move` and `POST /admin/events/{id}/move` both run it. Vitess moves a
table with MoveTables (copy, then SwitchTraffic); this moves one event, through the
booking services (shard_service/moves.py: every line of SQL stays there), in steps:

1. preflight   both shards' primaries answer; the event is open on the source; none of
               its tier ids or client references is another event's on the target
               (a collision refuses the move here, having changed nothing).
2. copy        every row of the event, page by page, exported from the source and
               upserted on the target by primary key, verbatim (ids, references,
               timestamps, statuses, prices); the target holds the event `importing`
               (it refuses its writes). The export's watermark starts the next round.
3. catch-up    the rows created or cancelled since the watermark, in rounds, until a
               round is small.
4. freeze      the source stops taking the event's writes: it takes the event's tier
               locks (so it waits for bookings in flight) and writes `frozen`. THE PAUSE
               of the event's writes starts here; no other event pauses.
5. final-copy  the last changes; then both sides' digests (per tier capacity, remaining
               and tickets sold; bookings and a checksum over them) must be equal; if
               not, the whole event is copied again, and a second mismatch rolls back.
6. flip        the event's placement names the target, by check-and-set on the index
               read at the start, with `sinceLsn`, the target's position after its last
               import (gateways read the event from a target copy only once it has
               replayed that far: read-your-writes across the move). THE COMMIT POINT.
7. activate    the target opens the event. The pause ends.
8. retire      the source deletes the event's rows and keeps a tombstone that answers
               `event-moved` (naming the target) to a gateway with a stale map.

The journal (`move-<event>` under the ops prefix, which gateways do not watch) records
the move's id, source, target, last step and watermark; a lease (`event-move-<event>`)
keeps two runners apart. Which side of the flip a move is on is read from the
placement, never from the journal: placed on the target, the move only goes forward
(activate, retire); placed on the source, a failure rolls it back (the source unfrozen,
the target's import abandoned) and running the command again resumes it (every step is
idempotent) — or `abort=True` rolls it back. A step that cannot reach a shard's primary
(a switchover under way, a restarting service) retries with the map read again, within
`retry_seconds`; a move that gives up is `MoveFailed` and resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from event_ops.shard_admin import AdminAnswer, ShardAdmin, ShardUnreachable
from failover.lease import Lease, LeaseHeld
from region_map import CasConflict, MapError, MapStore, NotFound, Shard

log = logging.getLogger("boxoffice.event_ops.move")

STEPS = ("preflight", "copy", "catch-up", "freeze", "final-copy", "flip", "activate", "retire")
JOURNAL_KIND = "move-"
LEASE_KIND = "event-move-"
PAGE_SIZE = 1000  # bookings per export page
CATCH_UP_ROUNDS = 5
SMALL_ROUND = 50  # rows: a catch-up round this small is the last before the freeze
RETRY_SECONDS = 30.0  # a step's calls retried while a shard's primary does not answer
LEASE_WAIT_SECONDS = 15.0  # for a dead runner's lease to expire (twice its TTL)
# Answers that say "not now" about a shard's primary, not "no" about the request.
RETRYABLE_KINDS = frozenset({
    "not-primary", "stale-epoch", "fenced", "read-only", "cancelled", "database-unavailable",
    "not-ready", "deadline-exceeded", "not-confirmed", "overloaded", "role-unknown",
})


def journal_id(event_id: str) -> str:
    return f"{JOURNAL_KIND}{event_id}"


class MoveRefused(Exception):
    """The move was refused or rolled back: nothing of it remains (`kind`, `detail`)."""

    def __init__(self, kind: str, detail: str, **extra: Any) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.extra = kind, detail, extra


class MoveFailed(Exception):
    """The move stopped part-way (a dependency did not answer): run it again to finish
    it (or roll it back, before its flip)."""

    def __init__(self, kind: str, detail: str, **extra: Any) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.extra = kind, detail, extra


@dataclass(frozen=True)
class MoveProgress:
    step: str
    state: str  # "begin" | "ok"
    detail: str = ""
    seconds: float = 0.0


Progress = Callable[[MoveProgress], None]
FaultHook = Callable[[str], Awaitable[None]]  # after each step (tests: kill the runner there)


@dataclass
class MoveReport:
    event_id: str
    move_id: str = ""
    source: str = ""
    target: str = ""
    outcome: str = ""  # moved | resumed | already-there (a rolled-back move raises MoveRefused)
    bookings_copied: int = 0
    pages: int = 0
    rounds: int = 0
    full_recopy: bool = False
    pause_seconds: float | None = None
    seconds: float = 0.0
    since_lsn: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        return {_camel(k): v for k, v in doc.items()}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


async def move_event(
    store: MapStore, admin: ShardAdmin, event_id: str, to_shard: str | None, *,
    abort: bool = False, progress: Progress | None = None, fault_hook: FaultHook | None = None,
    owner: str = "operator", retry_seconds: float = RETRY_SECONDS,
    lease_ttl: float | None = None, lease_wait_seconds: float = LEASE_WAIT_SECONDS,
) -> MoveReport:
    """Move `event_id` to `to_shard`, or resume (or, with `abort`, roll back) its move.
    `lease_ttl`: the lease's TTL (default failover.lease.LEASE_TTL); a runner that dies
    holds the move up for about twice that."""
    event_id = str(uuid.UUID(event_id))
    lease = await _take_lease(store, event_id, owner, lease_ttl, lease_wait_seconds, progress)
    try:
        move = _Move(store, admin, event_id, progress, fault_hook, retry_seconds, lease)
        return await move.run(to_shard, abort)
    finally:
        await lease.release()


async def move_status(store: MapStore, event_id: str) -> dict[str, Any]:
    """The event's placement and its last move's journal (None when it never moved)."""
    event_id = str(uuid.UUID(event_id))
    try:
        placed_on, _ = await store.read_placement(event_id)
    except NotFound:
        placed_on = None
    try:
        journal, _ = await store.read_journal(journal_id(event_id))
    except NotFound:
        journal = None
    side = None
    if journal is not None and placed_on is not None:
        side = "after-flip" if placed_on == journal.get("target") else "before-flip"
    return {"eventId": event_id, "placement": placed_on, "move": journal, "side": side}


async def _take_lease(store: MapStore, event_id: str, owner: str, ttl: float | None, wait: float,
                      progress: Progress | None) -> Lease:
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            return await Lease.take(store, f"{LEASE_KIND}{event_id}", owner, ttl)
        except LeaseHeld as exc:
            if time.monotonic() > deadline:
                raise MoveFailed("move-running", f"Another runner holds this event's move: "
                                 f"{exc.holder}.") from None
            if not told and progress is not None:
                progress(MoveProgress("lease", "begin", f"held by {exc.holder}; waiting for it "
                                      "to finish or expire"))
                told = True
            await asyncio.sleep(0.5)  # a held lease frees on release or TTL expiry, not on a signal
        except MapError as exc:
            raise MoveFailed("map-unavailable", f"Consul did not answer: {exc}") from None


class _Move:
    def __init__(self, store: MapStore, admin: ShardAdmin, event_id: str,
                 progress: Progress | None, fault_hook: FaultHook | None,
                 retry_seconds: float, lease: Lease | None = None) -> None:
        self.store = store
        self.lease = lease
        self.admin = admin
        self.event_id = event_id
        self.progress = progress
        self.fault_hook = fault_hook
        self.retry_seconds = retry_seconds
        self.report = MoveReport(event_id)
        self.journal: dict[str, Any] = {}
        self.journal_index = 0
        self.noted: dict[str, Any] = {}  # journal changes a step makes, written with its end
        self.source_digest: dict[str, Any] | None = None  # the frozen source's, from the freeze
        self.started = time.monotonic()

    # -- plumbing --------------------------------------------------------------------
    def _emit(self, step: str, state: str, detail: str = "", seconds: float = 0.0) -> None:
        if self.progress is not None:
            self.progress(MoveProgress(step, state, detail, seconds))

    async def _step(self, name: str, work: Callable[[], Awaitable[str]]) -> None:
        self._emit(name, "begin")
        began = time.monotonic()
        self.noted = {}
        detail = await work()
        seconds = time.monotonic() - began
        self.report.steps.append({"step": name, "seconds": round(seconds, 4), "detail": detail})
        await self._journal(step=name, **self.noted)  # one journal write per step
        self._emit(name, "ok", detail, seconds)
        if self.fault_hook is not None:
            await self.fault_hook(name)

    async def _journal(self, **changes: Any) -> None:
        doc = {**self.journal, **changes, "updatedAt": time.time()}
        try:
            self.journal_index = await self.store.put_journal(
                journal_id(self.event_id), doc, self.journal_index)
        except CasConflict:
            raise MoveFailed("journal-conflict",
                             "Another runner wrote this move's journal meanwhile.") from None
        except MapError as exc:
            raise MoveFailed("map-unavailable", f"Consul did not answer: {exc}") from None
        self.journal = doc

    async def _placement(self) -> tuple[str | None, int]:
        try:
            return await self.store.read_placement(self.event_id)
        except NotFound:
            return None, 0
        except MapError as exc:
            raise MoveFailed("map-unavailable", f"Consul did not answer: {exc}") from None

    async def _shard(self, name: str) -> Shard:
        try:
            shard, _ = await self.store.read_shard(name)
            return shard
        except NotFound:
            raise MoveRefused("unknown-shard", f"No shard named {name!r}.") from None
        except MapError as exc:
            raise MoveFailed("map-unavailable", f"Consul did not answer: {exc}") from None

    async def _call(self, shard_name: str, method: str, action: str, *, body: Any = None,
                    params: dict[str, str] | None = None) -> AdminAnswer:
        """One call to the shard's primary, retried (with the map read again) while the
        primary does not answer or says "not now"; any other answer is returned."""
        deadline = time.monotonic() + self.retry_seconds
        pause = 0.05
        while True:
            shard = await self._shard(shard_name)
            why = ""
            try:
                answer = await self.admin.call(
                    method, shard.primary, f"/admin/moves/{self.event_id}/{action}",
                    epoch=shard.epoch, body=body, params=params,
                    sequencer=self.lease.fence if self.lease is not None else None)
                if answer.status == 409 and answer.problem_type == "stale-sequencer":
                    # Another runner took this event's lease since (this one was paused
                    # past it): the shard refused the step; this runner stops here.
                    raise MoveFailed("lease-lost",
                                     f"Shard {shard_name} refused {action}: another runner has "
                                     "taken this move's lease since; nothing was changed by "
                                     "this step.")
                if not (answer.status == 503 and answer.problem_type in RETRYABLE_KINDS):
                    return answer
                why = f"{answer.status} {answer.problem_type}"
            except ShardUnreachable as exc:
                why = exc.detail
            if time.monotonic() > deadline:
                raise MoveFailed("shard-unavailable",
                                 f"Shard {shard_name}'s primary did not answer {action} "
                                 f"({why}); run the move again to finish it.")
            log.info("move call retried", extra={"shard": shard_name, "action": action, "why": why})
            await asyncio.sleep(pause)  # a back-off: the primary is restarting or changing
            pause = min(pause * 2, 0.5)

    @staticmethod
    def _fail(answer: AdminAnswer, action: str) -> MoveFailed:
        return MoveFailed("unexpected-answer",
                          f"{action}: {answer.status} {answer.doc.get('detail', answer.doc)}")

    # -- the operation -----------------------------------------------------------------
    async def run(self, to_shard: str | None, abort: bool) -> MoveReport:
        r = self.report
        placed_on, _ = await self._placement()
        try:
            self.journal, self.journal_index = await self.store.read_journal(journal_id(self.event_id))
        except NotFound:
            self.journal, self.journal_index = {}, 0
        except MapError as exc:
            raise MoveFailed("map-unavailable", f"Consul did not answer: {exc}") from None
        unfinished = self.journal.get("state") == "running"
        if placed_on is None:
            raise MoveRefused("event-not-found", f"Event {self.event_id} is not placed on any shard.")
        if unfinished:
            r.move_id, r.source, r.target = (self.journal["moveId"], self.journal["source"],
                                             self.journal["target"])
            if to_shard is not None and to_shard != r.target and not abort:
                raise MoveRefused("move-unfinished",
                                  f"A move of this event to {r.target} is unfinished: run it "
                                  f"again with --to-shard {r.target}, or abort it.",
                                  target=r.target)
            if placed_on == r.target:  # past the flip: forward only
                if abort:
                    raise MoveRefused("past-flip", "The move is past its flip: it only goes "
                                      "forward. Run it again (without abort) to finish it.")
                r.outcome = "resumed"
                await self._after_flip()
                return self._done()
            if placed_on != r.source:
                raise MoveFailed("placement-changed",
                                 f"The event is placed on {placed_on}, neither the move's source "
                                 f"{r.source} nor its target {r.target}.")
            if abort:
                await self._roll_back("aborted by the operator")
                raise MoveRefused("aborted", "The move was rolled back; the event stays on "
                                  f"{r.source}.")
            r.outcome = "resumed"
            return await self._forward(resume_from=self.journal.get("step"))
        if abort:
            raise MoveRefused("no-move", "This event has no unfinished move.")
        if to_shard is None:
            raise MoveRefused("invalid-request", "Name the shard to move the event to.")
        await self._shard(to_shard)  # exists
        if placed_on == to_shard:
            r.source = r.target = to_shard
            r.outcome = "already-there"
            r.seconds = time.monotonic() - self.started
            return r
        r.move_id = f"mv-{uuid.uuid4().hex[:12]}"
        r.source, r.target = placed_on, to_shard
        self.journal = {"kind": "move", "moveId": r.move_id, "eventId": self.event_id,
                        "source": r.source, "target": r.target, "state": "running",
                        "step": None, "startedAt": time.time()}
        await self._journal()  # replaces a finished move's journal (check-and-set on its index)
        r.outcome = "moved"
        return await self._forward(resume_from=None)

    async def _forward(self, resume_from: str | None) -> MoveReport:
        """The steps up to and through the flip, from the one after `resume_from`; a
        refusal before the flip rolls the move back."""
        before_flip = (("preflight", self._preflight), ("copy", self._copy),
                       ("catch-up", self._catch_up), ("freeze", self._freeze),
                       ("final-copy", self._final_copy))
        done = STEPS.index(resume_from) + 1 if resume_from in STEPS else 0
        try:
            for name, work in before_flip[done:]:
                await self._step(name, work)
        except MoveRefused as exc:
            await self._roll_back(exc.detail)
            raise
        await self._step("flip", self._flip)
        await self._after_flip()
        return self._done()

    async def _after_flip(self) -> None:
        """Activate and retire, from the one after the last step journalled (a move that
        died between the flip and its journal write left `final-copy` there)."""
        step = self.journal.get("step")
        done = STEPS.index(step) + 1 if step in STEPS else 0
        for name, work in (("activate", self._activate), ("retire", self._retire)):
            if done <= STEPS.index(name):
                await self._step(name, work)

    def _done(self) -> MoveReport:
        r = self.report
        r.seconds = time.monotonic() - self.started
        return r

    # -- steps -------------------------------------------------------------------------
    async def _preflight(self) -> str:
        r = self.report
        state = await self._call(r.source, "GET", "state")
        if state.status != 200:
            raise self._fail(state, "state")
        s = state.doc.get("state")
        if not state.doc.get("present"):
            raise MoveRefused("event-not-found", f"Event {self.event_id} is not on {r.source}.")
        if s not in ("open", "frozen") or (s == "frozen" and state.doc.get("moveId") != r.move_id):
            raise MoveRefused("move-conflict", f"The event is {s} on {r.source} "
                              f"(move {state.doc.get('moveId')}).")
        keys = await self._call(r.source, "GET", "keys")
        if keys.status != 200:
            raise self._fail(keys, "keys")
        found = await self._call(r.target, "POST", "collisions", body=keys.doc)
        if found.status != 200:
            raise self._fail(found, "collisions")
        doc = found.doc
        if doc.get("event") or doc.get("tierIds") or doc.get("clientReferences"):
            raise MoveRefused(
                "collision",
                f"Shard {r.target} already has "
                + ", ".join(filter(None, [
                    "the event" if doc.get("event") else "",
                    f"tier ids {doc['tierIds']}" if doc.get("tierIds") else "",
                    f"{len(doc['clientReferences'])} of its client references"
                    if doc.get("clientReferences") else ""]))
                + " (of other events): nothing was changed.",
                tierIds=doc.get("tierIds") or [], clientReferences=doc.get("clientReferences") or [])
        tiers = len(keys.doc.get("tierIds") or [])
        refs = len(keys.doc.get("clientReferences") or [])
        return f"{r.source} -> {r.target}: {tiers} tiers, {refs} references, no collision"

    async def _copy_round(self, since: str | None, digest: bool = False,
                          ) -> tuple[int, str | None, str | None, dict[str, Any] | None]:
        """Export every page changed since `since`, import each; (bookings, the first
        page's watermark, the last import's position, and with `digest` the target's
        digest after the last import)."""
        r = self.report
        after: str | None = None
        copied, watermark, lsn, target_digest = 0, None, None, None
        while True:
            params = {"limit": str(PAGE_SIZE)}
            if since:
                params["since"] = since
            if after:
                params["after"] = after
            page = await self._call(r.source, "GET", "export", params=params)
            if page.status != 200:
                raise self._fail(page, "export")
            if page.doc.get("event") is None:
                raise MoveFailed("event-gone", f"Event {self.event_id} is no longer on {r.source}.")
            watermark = watermark or page.doc.get("watermark")
            bookings = page.doc.get("bookings") or []
            body = {"moveId": r.move_id, "sourceShard": r.source, "digest": digest,
                    "page": {k: page.doc[k] for k in ("event", "tiers", "bookings")}}
            imported = await self._call(r.target, "POST", "import", body=body)
            if imported.status == 409:
                raise MoveRefused(imported.problem_type or "collision",
                                  f"Shard {r.target} refused the import: "
                                  f"{imported.doc.get('detail')}", **{
                                      k: v for k, v in imported.doc.items()
                                      if k in ("constraint", "state", "moveId")})
            if imported.status != 200:
                raise self._fail(imported, "import")
            lsn = imported.doc.get("lsn") or lsn
            target_digest = imported.doc.get("digest")
            copied += len(bookings)
            r.pages += 1
            if len(bookings) < PAGE_SIZE:
                return copied, watermark, lsn, target_digest
            after = bookings[-1]["id"]

    async def _copy(self) -> str:
        copied, watermark, _, _ = await self._copy_round(None)
        self.report.bookings_copied += copied
        self.report.rounds += 1
        await self._journal(watermark=watermark)
        return f"{copied} bookings in {self.report.pages} pages"

    async def _catch_up(self) -> str:
        total = rounds = 0
        while rounds < CATCH_UP_ROUNDS:
            copied, watermark, _, _ = await self._copy_round(self.journal.get("watermark"))
            total += copied
            rounds += 1
            self.report.rounds += 1
            await self._journal(watermark=watermark or self.journal.get("watermark"))
            if copied <= SMALL_ROUND:
                break
        self.report.bookings_copied += total
        return f"{total} bookings changed since the copy, in {rounds} rounds"

    async def _freeze(self) -> str:
        r = self.report
        asked_at = time.time()  # the pause is counted from before the freeze is asked for
        answer = await self._call(r.source, "POST", "freeze",
                                  body={"moveId": r.move_id, "targetShard": r.target})
        if answer.status == 409:
            raise MoveRefused("move-conflict", f"{r.source} refused the freeze: "
                              f"{answer.doc.get('detail')}")
        if answer.status != 200:
            raise self._fail(answer, "freeze")
        self.source_digest = answer.doc.get("digest")  # final: nothing of the event changes now
        if not self.journal.get("frozenAt"):
            self.noted["frozenAt"] = asked_at
        return f"{r.source} takes no more writes for the event"

    async def _source_digest(self) -> dict[str, Any]:
        """The frozen source's digest: the freeze's answer had it, unless this run resumed
        after the freeze."""
        if self.source_digest is None:
            answer = await self._call(self.report.source, "GET", "digest")
            if answer.status != 200:
                raise self._fail(answer, "digest")
            self.source_digest = answer.doc
        return self.source_digest

    async def _final_copy(self) -> str:
        r = self.report
        copied, _, lsn, target = await self._copy_round(self.journal.get("watermark"), digest=True)
        r.bookings_copied += copied
        source = await self._source_digest()
        if source != target:
            log.warning("move digests differ after the final copy: copying the event again",
                        extra={"event_id": self.event_id})
            r.full_recopy = True
            copied, _, lsn, target = await self._copy_round(None, digest=True)
            if source != target:
                raise MoveRefused("verify-failed",
                                  "The target's copy differs from the source's after a full "
                                  "copy; the move was rolled back.")
        for tier in source.get("tiers", []):
            if tier["sold"] + tier["remaining"] != tier["capacity"]:
                raise MoveRefused("verify-failed", f"Tier {tier['id']} does not add up on the "
                                  "source; the move was rolled back.")
        self.noted["sinceLsn"] = lsn  # every round imports a page (event and tiers at least)
        return (f"{copied} bookings, digests equal ({source.get('bookings')} bookings, "
                f"{len(source.get('tiers', []))} tiers); target at {lsn}")

    async def _flip(self) -> str:
        r = self.report
        placed_on, index = await self._placement()
        if placed_on == r.target:
            return f"placement already on {r.target}"
        if placed_on != r.source:
            raise MoveFailed("placement-changed", f"The event is placed on {placed_on}.")
        if self.lease is not None and not await self.lease.confirm():
            # Another runner may hold the event's lease now: the commit point is not ours.
            raise MoveFailed("lease-lost", "This runner's lease on the event could not be "
                             "confirmed before the flip (it expired, or Consul did not answer); "
                             "the placement is unchanged. Run the move again.")
        try:
            await self.store.move_event(self.event_id, r.target, index, self.journal.get("sinceLsn"))
        except CasConflict:
            placed_on, _ = await self._placement()
            if placed_on != r.target:
                raise MoveFailed("placement-changed",
                                 "The placement changed under the move; run it again.") from None
        except MapError as exc:
            # The write's outcome is unknown: the placement says, when read again.
            raise MoveFailed("map-unavailable", f"Consul did not answer: {exc}") from None
        r.since_lsn = self.journal.get("sinceLsn")
        return f"placement -> {r.target} (sinceLsn {r.since_lsn})"

    async def _activate(self) -> str:
        r = self.report
        answer = await self._call(r.target, "POST", "activate", body={"moveId": r.move_id})
        if answer.status != 200:
            raise self._fail(answer, "activate")
        frozen_at = self.journal.get("frozenAt")
        if frozen_at:
            r.pause_seconds = round(time.time() - float(frozen_at), 4)
            self.noted["pauseSeconds"] = r.pause_seconds
        return f"{r.target} takes the event's writes" + (
            f" (writes paused {r.pause_seconds * 1000:.0f} ms)" if r.pause_seconds is not None else "")

    async def _retire(self) -> str:
        r = self.report
        answer = await self._call(r.source, "POST", "retire",
                                  body={"moveId": r.move_id, "targetShard": r.target})
        if answer.status != 200:
            raise self._fail(answer, "retire")
        r.pause_seconds = r.pause_seconds or self.journal.get("pauseSeconds")
        r.since_lsn = r.since_lsn or self.journal.get("sinceLsn")
        self.noted.update(state="done", finishedAt=time.time(),
                          bookingsCopied=r.bookings_copied or self.journal.get("bookingsCopied") or 0)
        return f"{r.source} keeps a tombstone ({answer.doc.get('bookings', 0)} bookings deleted)"

    async def _roll_back(self, why: str) -> None:
        """Before the flip only: open the event on the source again, drop the target's copy."""
        r = self.report
        placed_on, _ = await self._placement()
        if placed_on == r.target:
            raise MoveFailed("past-flip", "The placement names the target: the move goes forward.")
        self._emit("roll-back", "begin", why)
        began = time.monotonic()
        unfrozen = False
        with contextlib.suppress(MoveFailed):  # the source first: its event's writes wait
            unfrozen = (await self._call(r.source, "POST", "unfreeze",
                                         body={"moveId": r.move_id})).status == 200
        abandoned = await self._call(r.target, "POST", "abandon", body={"moveId": r.move_id})
        if abandoned.status != 200:
            raise self._fail(abandoned, "abandon")
        if not unfrozen:
            answer = await self._call(r.source, "POST", "unfreeze", body={"moveId": r.move_id})
            if answer.status != 200:
                raise self._fail(answer, "unfreeze")
        await self._journal(state="rolled-back", reason=why, finishedAt=time.time())
        self._emit("roll-back", "ok", f"{r.source} open again, {r.target}'s copy removed",
                   time.monotonic() - began)
