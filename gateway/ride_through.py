"""Riding through a change of primary: a write waits for the map, not for a timer.

Vitess's vtgate buffers a shard's writes while a reparent runs and releases them when
the new primary is known; this is the same idea over the region map. The rules
(`WriteForwarder` in gateway/writes.py applies them, attempt by attempt):

- **In transition**: while the map says a shard is in a planned transition
  (`Shard.transition`, set by a switchover), its writes are not sent: each one is held
  until the map's record of the shard no longer says so (the switchover's commit, which
  names the new primary at epoch + 1, or its rollback). The map change itself releases
  them (`MapWatcher.wait_for`, woken by each change: no polling delay). A transition
  this gateway has seen for `stale_transition_seconds` (by its own monotonic clock,
  from when it first saw that very transition: common/observed.py; never by the wall
  time the switchover wrote in it) is taken for one whose runner died and is ignored:
  writes go to the primary again (and are retried like any other). A restarted gateway
  sees every transition as new: it holds longer, never shorter.
- **Refused by epoch**: a `fenced`, `stale-epoch` or `not-primary` answer whose problem
  document names an epoch above the one the attempt was routed by says this gateway's
  map is behind: the write waits for a map with a higher epoch for the shard (bounded by
  the write's window) and goes to the primary that map names, under the same key.
- **Refused, no newer epoch known; no answer; another retryable 503**: the copy may be
  the new primary finishing its promotion, or a primary that died. The write waits for
  the map's record of the shard to change, at most a short back-off; a change (a new
  primary, a transition) releases it at once, otherwise it tries again.

- **Event moving** (`event-moving`, event_ops/move.py): the event's source shard has
  frozen it for a move. The write waits for the event's placement to leave that shard
  (the move's flip), then goes to the shard the map names, under the same key; a move
  that rolls back instead leaves the placement alone, so the wait is cut into short
  slices between which the write is tried again. The target answers `event-moving`
  too in the moment between the flip and its activation: a short back-off.
- **Event moved** (`event-moved`, 421, naming the shard that has the event): this
  gateway's map is behind a finished move. The write waits for the placement to name
  another shard than the one that answered, then goes there.

Everything is bounded by the write's window (`write_retry_seconds`): a write still held
when it ends gets a 503 with its idempotency key, which replays it later. Held writes
are counted (`boxoffice_gateway_held_writes`, by shard) and their waits timed
(`boxoffice_gateway_write_hold_seconds`, by reason and outcome).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from prometheus_client import Gauge, Histogram

from common.observed import FirstSeen
from region_map import RegionMap, Shard
from region_map.model import Transition

HELD_WRITES = Gauge(
    "boxoffice_gateway_held_writes",
    "Writes waiting for the region map to move on (a shard in transition, a refused epoch, "
    "an unreachable primary)",
    ["shard"],
)
HOLD_SECONDS = Histogram(
    "boxoffice_gateway_write_hold_seconds",
    "How long a write waited for the region map, by why and how the wait ended",
    ["reason", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)

# Problem types by which a booking service refuses a write for the shard's epoch or role.
EPOCH_REFUSALS = frozenset({"fenced", "stale-epoch", "not-primary"})
EVENT_MOVING, EVENT_MOVED = "event-moving", "event-moved"
STALE_TRANSITION_SECONDS = 30.0


class MapSource(Protocol):
    """What the ride-through needs of a `MapWatcher`."""

    @property
    def current(self) -> RegionMap | None: ...

    async def wait_for(self, predicate: Callable[[RegionMap], bool], timeout: float) -> RegionMap: ...


def refusal(status: int, body: bytes) -> tuple[str, int | None]:
    """(problem kind, the epoch it names or None) of a 503 or 421 answer; ("", None) otherwise."""
    if status not in (503, 421):
        return "", None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "", None
    if not isinstance(doc, dict):
        return "", None
    kind = str(doc.get("type", "")).rsplit("/", 1)[-1]
    epoch = doc.get("epoch")
    valid = isinstance(epoch, int) and not isinstance(epoch, bool)
    return kind, epoch if valid else None


def moved_to(status: int, body: bytes) -> str | None:
    """The shard an `event-moved` answer (421) names: where the event is now; None for
    any other answer."""
    if status != 421:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    named = doc.get("shard") if isinstance(doc, dict) else None
    kind = str(doc.get("type", "")).rsplit("/", 1)[-1] if isinstance(doc, dict) else ""
    return named if kind == EVENT_MOVED and isinstance(named, str) and named else None


class RideThrough:
    """Waits on the region map for one gateway's writes."""

    def __init__(self, watcher: MapSource, *,
                 stale_transition_seconds: float = STALE_TRANSITION_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.watcher = watcher
        self.stale_transition_seconds = stale_transition_seconds
        self.transitions: FirstSeen[tuple[str, Transition]] = FirstSeen(clock)

    def in_transition(self, shard: Shard) -> bool:
        """The shard's writes are to be held now: a transition this gateway has seen for
        less than `stale_transition_seconds` of its own time."""
        transition = shard.transition
        if transition is None:
            return False
        if len(self.transitions) > 64:  # forget the transitions the map no longer has
            current = self.watcher.current
            self.transitions.keep(
                (s.name, s.transition) for s in (current.shards.values() if current else ())
                if s.transition is not None)
        return self.transitions.age((shard.name, transition)) < self.stale_transition_seconds

    async def hold(self, shard: Shard, timeout: float) -> Shard | None:
        """Hold a write while `shard` is in transition: the shard's record once the map
        no longer says so (or names another primary or epoch); None after `timeout`."""
        name, epoch = shard.name, shard.epoch

        def released(record: Shard | None) -> bool:
            return record is None or record.epoch != epoch or not self.in_transition(record)

        return await self._wait(name, released, timeout, "transition")

    async def newer_epoch(self, shard: Shard, timeout: float) -> Shard | None:
        """Wait for a map whose record of the shard has an epoch above `shard.epoch` (the
        one a refused attempt was routed by); None after `timeout`."""
        epoch = shard.epoch
        return await self._wait(shard.name, lambda r: r is None or r.epoch > epoch, timeout,
                                "newer-epoch")

    async def changed(self, shard: Shard, timeout: float, reason: str) -> Shard | None:
        """Wait (at most `timeout`, a back-off) for the map's record of the shard to differ
        from `shard` in what routes a write: primary, epoch or transition."""
        seen = (shard.primary_copy, shard.epoch, shard.transition)
        return await self._wait(
            shard.name, lambda r: r is None or (r.primary_copy, r.epoch, r.transition) != seen,
            timeout, reason)

    async def placement_left(self, event_id: str, shard_name: str, timeout: float,
                             reason: str) -> bool:
        """Wait (at most `timeout`) until the map places `event_id` on another shard than
        `shard_name`; True when it does."""
        if timeout <= 0:
            return False
        async with self._held(shard_name, reason) as outcome:
            try:
                await self.watcher.wait_for(
                    lambda m: m.placements.get(event_id) not in (None, shard_name), timeout)
            except TimeoutError:
                outcome[0] = "timeout"
                return False
            outcome[0] = "released"
            return True

    async def _wait(self, name: str, done: Callable[[Shard | None], bool], timeout: float,
                    reason: str) -> Shard | None:
        if timeout <= 0:
            return None
        async with self._held(name, reason) as outcome:
            try:
                found = await self.watcher.wait_for(lambda m: done(m.shards.get(name)), timeout)
            except TimeoutError:
                outcome[0] = "timeout"
                return None
            outcome[0] = "released"
            return found.shards.get(name)

    @contextlib.asynccontextmanager
    async def _held(self, shard: str, reason: str) -> AsyncIterator[list[str]]:
        gauge = HELD_WRITES.labels(shard)
        gauge.inc()
        started = time.monotonic()
        outcome = ["cancelled"]
        try:
            yield outcome
        finally:
            gauge.dec()
            HOLD_SECONDS.labels(reason, outcome[0]).observe(time.monotonic() - started)
