"""Events per shard, for operators (`GET /admin/events`, `boxoffice event list`).

For each shard of the map (or one), the events its primary holds, read through its
booking service (`GET /api/events?include=unlisted`, page after page: unlisted events
too, marked `unlisted`), joined with the map's placements. Each event gets a status:

- `placed`: held by the shard and placed on it (the normal case);
- `placed-elsewhere`: held here but placed on another shard (`placedOn`): a moved
  event's tombstone, or the source copy of a move in progress;
- `not-placed`: held here and placed nowhere: a half-created event whose placement
  was removed (or never written), listed by no gateway and bookable by nobody;
- `missing`: placed here but not held: a creation that did not reach the shard
  (sending the create again, same id, finishes it), or a lost event;
- `unverified`: placed here, but the shard's primary could not be read (or held
  more than `MAX_PAGES` pages), so whether it holds the event is not known.

The primary, not a replica, is read: it is the copy that takes the event's writes,
and a replica may lag behind a creation. A shard whose primary does not answer is
reported (`unreadable`), never fatal to the rest of the listing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from event_ops.shard_admin import ShardAdmin, ShardUnreachable
from region_map import RegionMap, Shard

PAGE_LIMIT = 200  # the booking service's largest page
MAX_PAGES = 1000  # per shard: 200,000 events; beyond, the rest is `unverified`
READ_TIMEOUT_SECONDS = 5.0


class EventStatus(StrEnum):
    PLACED = "placed"
    PLACED_ELSEWHERE = "placed-elsewhere"
    NOT_PLACED = "not-placed"
    MISSING = "missing"
    UNVERIFIED = "unverified"


class UnknownShard(ValueError):
    """The listing was asked for a shard the map does not have."""

    def __init__(self, shard: str) -> None:
        super().__init__(f"Unknown shard {shard!r}.")
        self.shard = shard


@dataclass(frozen=True)
class ListedEvent:
    id: str
    status: EventStatus
    placed_on: str | None  # the map's placement (None: placed nowhere)
    name: str | None = None  # as the shard holds it (None when it does not)
    venue: str | None = None
    starts_at: str | None = None
    unlisted: bool = False  # never in the public listing (drills, tests)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "status": str(self.status), "placedOn": self.placed_on,
                "name": self.name, "venue": self.venue, "startsAt": self.starts_at,
                "unlisted": self.unlisted}


@dataclass(frozen=True)
class ShardEvents:
    shard: str
    primary: str  # the copy read (the map's primary)
    primary_region: str
    events: tuple[ListedEvent, ...]
    unreadable: str | None = None  # why the primary's events could not be read in full

    def count(self, status: EventStatus) -> int:
        return sum(1 for e in self.events if e.status is status)

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard, "primary": self.primary, "primaryRegion": self.primary_region,
                "unreadable": self.unreadable,
                "counts": {str(s): self.count(s) for s in EventStatus},
                "events": [e.to_json() for e in self.events]}


@dataclass(frozen=True)
class EventListing:
    shards: tuple[ShardEvents, ...]
    map_index: int

    def to_json(self) -> dict[str, Any]:
        return {"mapIndex": self.map_index, "shards": [s.to_json() for s in self.shards]}


class _Unreadable(Exception):
    pass


async def list_events(admin: ShardAdmin, region_map: RegionMap,
                      shard: str | None = None) -> EventListing:
    """Every shard's events (or `shard`'s alone: `UnknownShard` if the map has none)."""
    if shard is not None and shard not in region_map.shards:
        raise UnknownShard(shard)
    chosen = [region_map.shards[shard]] if shard is not None else list(region_map.shards.values())
    listed = await asyncio.gather(*(_shard_events(admin, region_map, s) for s in chosen))
    return EventListing(tuple(listed), region_map.index)


async def _shard_events(admin: ShardAdmin, region_map: RegionMap, shard: Shard) -> ShardEvents:
    placed_here = {e for e, s in region_map.placements.items() if s == shard.name}
    unreadable: str | None = None
    try:
        held = await _held_events(admin, shard)
    except _Unreadable as exc:
        held, unreadable = [], str(exc)
    events: list[ListedEvent] = []
    seen: set[str] = set()
    for doc in held:
        event_id = doc["id"]
        seen.add(event_id)
        placed_on = region_map.placements.get(event_id)
        status = (EventStatus.PLACED if placed_on == shard.name else
                  EventStatus.NOT_PLACED if placed_on is None else EventStatus.PLACED_ELSEWHERE)
        events.append(ListedEvent(event_id, status, placed_on, doc.get("name"), doc.get("venue"),
                                  doc.get("startsAt"), doc.get("unlisted") is True))
    absent = EventStatus.UNVERIFIED if unreadable else EventStatus.MISSING
    events += [ListedEvent(e, absent, shard.name) for e in sorted(placed_here - seen)]
    return ShardEvents(shard.name, shard.primary_copy, shard.primary_region, tuple(events),
                       unreadable)


async def _held_events(admin: ShardAdmin, shard: Shard) -> list[dict[str, Any]]:
    """The events the shard's primary holds, in its order (startsAt, id); `_Unreadable`
    when it does not answer, answers something else than a listing, or has more than
    `MAX_PAGES` pages."""
    held: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        params = ({"limit": str(PAGE_LIMIT), "include": "unlisted"}  # operators see them all
                  | ({"cursor": cursor} if cursor else {}))
        try:
            answer = await admin.call("GET", shard.primary, "/api/events", params=params,
                                      timeout=READ_TIMEOUT_SECONDS)
        except ShardUnreachable:
            raise _Unreadable(f"its primary ({shard.primary_copy}) did not answer") from None
        if answer.status != 200:
            raise _Unreadable(f"its primary ({shard.primary_copy}) answered {answer.status} "
                              f"{answer.problem_type}".rstrip())
        events, cursor = answer.doc.get("events"), answer.doc.get("nextCursor")
        if not isinstance(events, list) or not (cursor is None or isinstance(cursor, str)) or not all(
                isinstance(e, dict) and isinstance(e.get("id"), str) for e in events):
            raise _Unreadable(f"its primary ({shard.primary_copy}) answered an unreadable listing")
        held += events
        if cursor is None:
            return held
    raise _Unreadable(f"its primary ({shard.primary_copy}) holds more than "
                      f"{MAX_PAGES * PAGE_LIMIT} events")
