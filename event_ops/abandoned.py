"""Moves whose runner died: settled by the active failover controller (failover/controller.py).

A move killed between its freeze and its activation leaves its event refusing writes
(frozen on the source, or not yet open on the target) until someone runs it again. The
controller does, as it does for an abandoned promotion or switchover: every scan it
lists the `move-*` journals still `running` whose lease (`event-move-<event>`) no runner
holds and that it has seen unchanged (the same modify index) for `min_age` seconds of
its own monotonic clock (common/observed.py; the journal's `updatedAt` is the runner's
wall clock, for people to read, and decides nothing), and for each:

- past the flip (the placement names the move's target): finishes it, forward only
  (activate, retire), exactly as `boxoffice event move` run again would;
- before the flip: rolls it back (`abort`): the source is unfrozen and the target's
  copy removed, so the event takes bookings again on the shard it never left. An
  operator who still wants the move runs it again; it starts afresh.

The lease makes the controller and an operator's rerun exclusive; whichever takes it
second finds the move settled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from common.observed import FirstSeen
from event_ops.move import JOURNAL_KIND, LEASE_KIND, MoveFailed, MoveRefused, move_event
from event_ops.shard_admin import ShardAdmin
from region_map import MapError, MapStore, NotFound

log = logging.getLogger("boxoffice.event_ops.abandoned")

MIN_AGE_SECONDS = 2.0  # a journal written this recently may belong to a runner still starting


@dataclass(frozen=True)
class Settled:
    event_id: str
    action: str  # "finished" | "rolled-back" | "failed"
    detail: str


# This process's sightings of move journals, (journal id, modify index) -> first seen.
_SEEN: FirstSeen[tuple[str, int]] = FirstSeen()


async def abandoned_moves(store: MapStore, min_age: float = MIN_AGE_SECONDS,
                          seen: FirstSeen[tuple[str, int]] | None = None,
                          ) -> list[tuple[str, dict[str, Any]]]:
    """(event id, journal) of every unfinished move no runner holds, that this observer
    (`seen`: the caller's sightings; this process's by default) has seen unchanged for
    `min_age` seconds of its own clock; the longest seen first."""
    seen = _SEEN if seen is None else seen
    journals = await store.list_journals(JOURNAL_KIND)
    seen.keep((op_id, index) for op_id, (_, index) in journals.items())
    out = []
    for op_id, (doc, index) in journals.items():
        if doc.get("state") != "running":
            continue
        age = seen.age((op_id, index))
        if age < min_age:
            continue
        event_id = op_id[len(JOURNAL_KIND):]
        if (await store.lock_holder(f"{LEASE_KIND}{event_id}")).session is not None:
            continue  # its runner is alive
        out.append((age, event_id, doc))
    return [(event_id, doc) for _, event_id, doc in sorted(out, key=lambda item: -item[0])]


async def settle(store: MapStore, admin: ShardAdmin, event_id: str, doc: dict[str, Any],
                 owner: str) -> Settled:
    """Finish (past its flip) or roll back (before it) one abandoned move."""
    try:
        placed_on, _ = await store.read_placement(event_id)
    except NotFound:
        placed_on = None
    forward = placed_on == doc.get("target")
    try:
        report = await move_event(store, admin, event_id, None, abort=not forward, owner=owner,
                                  lease_wait_seconds=0.0)
    except MoveRefused as exc:
        if exc.kind == "aborted":
            return Settled(event_id, "rolled-back", exc.detail)
        return Settled(event_id, "failed", f"{exc.kind}: {exc.detail}")
    except (MoveFailed, MapError) as exc:
        return Settled(event_id, "failed", str(exc))
    return Settled(event_id, "finished", f"{report.source} -> {report.target}, "
                   f"pause {report.pause_seconds} s")
