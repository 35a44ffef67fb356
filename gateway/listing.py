"""The event listing across shards: one keyset page of placed events, in (startsAt, id) order.

Rules:
- Every shard sorts its events by (startsAt, id) and pages with the same cursor,
  so the gateway asks each shard for the events after the client's cursor and
  merges them by the *parsed* timestamp and the id (text order would put
  `...:00.500000Z` before `...:00Z`).
- A shard may hold events that are not placed on it (a copy left behind by a
  move, or one not placed yet); they are not listed. They are dropped per shard
  *before* the page is cut: a shard is read page after page (following its own
  `nextCursor`) until it has `limit` placed events after the cursor or has no
  more, so such copies can never push a placed event off the page. The extra
  reads are bounded (`MAX_EXTRA_READS` per shard); a shard that needs more
  answers 503 rather than a wrong page.
- The page is the first `limit` of the merge; the next cursor is the position of
  its last event, given when any shard has more, or the merge had more.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from common.cursor import Cursor, decode_cursor, parse_timestamp
from common.problems import Problem
from region_map import RegionMap, Shard

MAX_EXTRA_READS = 20

# Reads one page of a shard's listing: (shard, cursor or None, limit) -> the
# service's JSON answer {"events": [...], "nextCursor": str | None}.
ReadPage = Callable[[Shard, Cursor | None, int], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class _Listed:
    position: Cursor  # (startsAt, id): the sort key, and the cursor after this event
    event: dict[str, Any]


@dataclass(frozen=True)
class Page:
    events: list[dict[str, Any]]
    next_cursor: Cursor | None

    def to_json(self) -> dict[str, Any]:
        return {"events": self.events,
                "nextCursor": self.next_cursor.encode() if self.next_cursor else None}


def _unreadable(shard: Shard) -> Problem:
    return Problem(503, "shard-unavailable", f"Shard {shard.name} could not list events.",
                   headers={"Retry-After": "1"})


def _position(shard: Shard, event: object) -> Cursor:
    """An event's (startsAt, id), checked: a shard's answer is parsed like a client's."""
    if isinstance(event, dict):
        raw_start, raw_id = event.get("startsAt"), event.get("id")
        starts_at = parse_timestamp(raw_start) if isinstance(raw_start, str) else None
        try:
            event_id = uuid.UUID(raw_id) if isinstance(raw_id, str) else None
        except ValueError:
            event_id = None
        if starts_at is not None and event_id is not None:
            return Cursor(starts_at, event_id)
    raise _unreadable(shard)


async def _placed_on_shard(read: ReadPage, region_map: RegionMap, shard: Shard, limit: int,
                           after: Cursor | None) -> tuple[list[_Listed], bool]:
    """Up to `limit` events placed on `shard` after `after` (more only if one page
    gave more), and whether the shard may hold more after them."""
    placed: list[_Listed] = []
    cursor = after
    for _ in range(1 + MAX_EXTRA_READS):
        page = await read(shard, cursor, limit)
        events, raw_next = page.get("events"), page.get("nextCursor")
        if not isinstance(events, list) or not (raw_next is None or isinstance(raw_next, str)):
            raise _unreadable(shard)
        for event in events:
            position = _position(shard, event)
            home = region_map.shard_for_event(str(position.event_id))
            if home is not None and home.name == shard.name:
                event["shard"] = shard.name
                event["homeRegion"] = shard.primary_region
                placed.append(_Listed(position, event))
        if raw_next is None:
            return placed, False
        if len(placed) >= limit:
            return placed, True
        try:
            cursor = decode_cursor(raw_next)
        except Problem:
            raise _unreadable(shard) from None
    raise Problem(
        503, "listing-unavailable",
        f"Shard {shard.name} holds too many unplaced event copies to list this page now.",
        headers={"Retry-After": "1"},
    )


async def list_placed_events(read: ReadPage, region_map: RegionMap, limit: int,
                             after: Cursor | None, shards: Iterable[Shard] | None = None) -> Page:
    """The first `limit` placed events after `after`, across `shards` (default: all)."""
    chosen = list(region_map.shards.values() if shards is None else shards)
    results = await asyncio.gather(
        *(_placed_on_shard(read, region_map, s, limit, after) for s in chosen))
    merged = sorted((item for items, _ in results for item in items), key=lambda i: i.position)
    taken = merged[:limit]
    more = len(merged) > limit or any(has_more for _, has_more in results)
    next_cursor = taken[-1].position if more and taken else None
    return Page([item.event for item in taken], next_cursor)
