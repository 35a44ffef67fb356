"""Create an event with its tiers on a shard, and place it (`POST /admin/events`,
`boxoffice event create`: both run `create_event`).

Rules:
- Everything the operator sent is checked before anything is written: the spec
  (`common.api.parse_event_spec`), the optional `shard` (a shard of the map) and
  `venueRegion` (a region of the map). A bad request writes nothing anywhere.
- Booking ids carry their event's first 8 bytes and are routed by them, so an id
  whose 8 bytes another placed event already has is refused.
- Which shard: the one asked for; else the default policy (`choose_shard`): the
  shard whose primary is homed nearest the venue's region, the least loaded
  (fewest placed events) of those first; with no venue region, the least loaded.
- The placement is written first (check-and-set create): the map is what routes,
  and a placement without its event only answers 404s, while an event without a
  placement would be listed but not bookable. Then the shard's primary creates
  the event. A definitive refusal there (a 4xx; or a 503 that says nothing was
  written: not the primary, a stale epoch, fenced) removes the placement again;
  an unknown outcome (the primary did not answer, or answered a 5xx that does not
  say nothing was written) keeps it, and sending the same request (same id) again
  finishes the creation on the placed shard.
- Creation is idempotent: the shard creates the event in one committed procedure
  (shard_service/sql/events.sql). The same request again (same id, same spec)
  answers the event, once the shard's synchronous standbys hold it (an earlier
  attempt may have committed on the primary alone); another event under the same
  id is refused (`event-exists`, naming the event). So concurrent creations of one
  id: one placement wins the check-and-set; the others find it and send the event
  to the same shard, which creates it once and answers every one of them with it.
- `unlisted: true` (default false): the event is never in the public listing
  (`GET /api/events`, any gateway), but is readable by id, bookable, moved and
  audited like any other, and marked in the operator's listing (drills, tests).

Outcomes are typed: `CreatedEvent`, or `CreateRefused` (nothing was created by this
attempt: HTTP 4xx, CLI exit 1) or `CreateFailed` (a dependency failed: HTTP 503, CLI
exit 2; `placed` says whether the placement stays and sending the request again
finishes it).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from common.api import EventSpec, parse_event_spec
from common.ids import routing_prefix
from common.problems import Problem
from event_ops.shard_admin import ShardAdmin, ShardUnreachable
from region_map import CasConflict, MapError, MapStore, NotFound, RegionMap

log = logging.getLogger("boxoffice.event_ops")

CREATE_TIMEOUT_SECONDS = 5.0  # the shard primary's one `POST /admin/events`
MAX_NAME_LENGTH = 100  # of a shard or region named in a request
# Booking-service refusals that say nothing was written (shard_service/app.py).
NOTHING_WRITTEN = frozenset({"not-primary", "stale-epoch", "fenced"})
PLACEMENT_FIELDS = ("shard", "venueRegion")  # read here, not part of the event spec
LSN_HEADER = "x-boxoffice-lsn"  # the commit position a booking service answers with


class CreateError(Exception):
    """The event was not created by this attempt; `kind` is a stable machine name
    (the problem type of the admin API), `extra` what a client may act on."""

    def __init__(self, kind: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.extra = extra


class CreateRefused(CreateError):
    """Refused: this attempt created nothing. `status` is the HTTP status that says
    why (400 a bad request, 409 a conflict, or the shard's own 4xx); `retry_after`
    is set when sending it again later may succeed (a concurrent creation)."""

    def __init__(self, status: int, kind: str, detail: str, *, retry_after: int | None = None,
                 **extra: Any) -> None:
        super().__init__(kind, detail, **extra)
        self.status = status
        self.retry_after = retry_after


class InvalidRequest(CreateRefused):
    """The request is malformed: `errors` names the fields ([{field, detail}])."""

    def __init__(self, detail: str, field: str | None = None, *, kind: str = "invalid-request",
                 errors: list[dict[str, str]] | None = None) -> None:
        errors = errors if errors is not None else (
            [{"field": field, "detail": detail}] if field else [])
        super().__init__(400, kind, detail)
        if errors:
            self.extra["errors"] = errors


class CreateFailed(CreateError):
    """A dependency (Consul, the shard's primary) failed. `placed`: the placement is
    written and stays; the event may or may not exist yet, and sending the same
    request (same id) again finishes the creation."""

    def __init__(self, kind: str, detail: str, *, placed: bool, **extra: Any) -> None:
        super().__init__(kind, detail, **extra)
        self.placed = placed


@dataclass(frozen=True)
class CreateRequest:
    spec: EventSpec
    shard: str | None = None  # the operator's choice
    venue_region: str | None = None  # for the default policy


@dataclass(frozen=True)
class ShardChoice:
    shard: str
    reason: str  # "requested", "nearest to <region>", "least loaded"
    placed_events: int  # events placed on it before this one


@dataclass(frozen=True)
class CreatedEvent:
    event: dict[str, Any]  # the shard's answer (the event and its tiers), with shard and homeRegion
    shard: str
    home_region: str
    choice: ShardChoice | None  # None: the placement existed (a retry finished the creation)
    lsn: str | None  # the commit position on the shard's primary (for consistency tokens)

    @property
    def event_id(self) -> str:
        return str(self.event["id"])

    def to_json(self) -> dict[str, Any]:
        return dict(self.event)


def _name(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME_LENGTH or not value.isprintable():
        raise InvalidRequest(f"{key} must be a name of 1 to {MAX_NAME_LENGTH} printable characters.",
                             key)
    return value


def parse_create_request(body: dict[str, Any]) -> CreateRequest:
    """The operator's request: an event spec plus the optional `shard` and `venueRegion`
    (their shape only; `create_event` checks them against the map)."""
    shard, venue_region = _name(body, "shard"), _name(body, "venueRegion")
    try:
        spec = parse_event_spec({k: v for k, v in body.items() if k not in PLACEMENT_FIELDS})
    except Problem as problem:
        raise InvalidRequest(problem.detail, kind=problem.type,
                             errors=list(problem.extra.get("errors") or [])) from None
    return CreateRequest(spec, shard, venue_region)


def placed_counts(region_map: RegionMap) -> Counter[str]:
    """Events placed per shard of the map (every shard present, 0 for an empty one)."""
    counts: Counter[str] = Counter({name: 0 for name in region_map.shards})
    for shard in region_map.placements.values():
        if shard in counts:
            counts[shard] += 1
    return counts


def choose_shard(region_map: RegionMap, venue_region: str | None) -> ShardChoice:
    """The default policy: the shard whose primary is in the region nearest the venue's
    (by the map's latency figures), the least loaded first, then by name; with no venue
    region, the least loaded shard."""
    if not region_map.shards:
        raise CreateRefused(409, "no-shards", "The region map has no shards to place an event on.")
    counts = placed_counts(region_map)
    if venue_region is None:
        name = min(counts, key=lambda n: (counts[n], n))
        return ShardChoice(name, "least loaded", counts[name])
    rank = {region: n for n, region in enumerate(region_map.nearest_regions(venue_region))}
    name = min(counts, key=lambda n: (rank.get(region_map.shards[n].primary_region, len(rank)),
                                      counts[n], n))
    return ShardChoice(name, f"nearest to {venue_region}", counts[name])


def check_against_map(request: CreateRequest, region_map: RegionMap) -> None:
    """The request's shard and venue region exist, and its id's routing prefix is free."""
    if request.shard is not None and request.shard not in region_map.shards:
        raise InvalidRequest(f"Unknown shard {request.shard!r}.", "shard")
    if request.venue_region is not None and request.venue_region not in region_map.regions:
        raise InvalidRequest(f"Unknown region {request.venue_region!r}: venueRegion must name a "
                             "region of the map.", "venueRegion")
    event_id = str(request.spec.id)
    sharing = region_map.event_for_prefix(routing_prefix(request.spec.id))
    if sharing is not None and sharing != event_id:
        raise CreateRefused(
            409, "event-id-prefix-taken",
            f"Event {sharing} already starts with the same 8 bytes as {event_id}; booking "
            "ids are routed by them, so choose another id (or let the platform choose).",
        )


async def create_event(store: MapStore, admin: ShardAdmin, request: CreateRequest, *,
                       region_map: RegionMap | None = None,
                       default_venue_region: str | None = None) -> CreatedEvent:
    """Create the event and place it (see the module's rules). `region_map`: the map to
    check and choose by (default: loaded from `store`); `default_venue_region`: the venue
    region when the request names none (a gateway passes its own region)."""
    if region_map is None:
        region_map = await _load(store)
    check_against_map(request, region_map)
    event_id = str(request.spec.id)
    choice: ShardChoice | None = None
    if request.shard is not None:
        choice = ShardChoice(request.shard, "requested", placed_counts(region_map)[request.shard])
    else:
        venue = request.venue_region or default_venue_region
        choice = choose_shard(region_map, venue if venue in region_map.regions else None)
    placed_now, shard_name = await _place(store, event_id, choice.shard, request.shard)
    shard = region_map.shards.get(shard_name)
    if shard is None:
        raise CreateRefused(409, "event-exists",
                            f"Event {event_id} is already placed, on unknown shard {shard_name}.",
                            eventId=event_id)
    try:
        answer = await admin.call("POST", shard.primary, "/admin/events", epoch=shard.epoch,
                                  body=request.spec.to_json(), timeout=CREATE_TIMEOUT_SECONDS)
    except ShardUnreachable as exc:
        log.warning("event creation: primary did not answer",
                    extra={"shard": shard_name, "error": exc.detail})
        raise CreateFailed(
            "shard-unavailable",
            f"Shard {shard_name}'s primary did not answer; event {event_id} is placed on it but "
            "may not exist yet: send the same request, with this id, again to finish.",
            placed=True, eventId=event_id, shard=shard_name,
        ) from None
    if answer.status in (200, 201):  # 200: the same creation, done already (and durable)
        event = dict(answer.doc)
        event["shard"] = shard_name
        event["homeRegion"] = shard.primary_region
        return CreatedEvent(event, shard_name, shard.primary_region,
                            choice if placed_now else None, _header(answer.headers, LSN_HEADER))
    kind = answer.problem_type or "shard-refused"
    detail = str(answer.doc.get("detail") or f"Shard {shard_name} refused the event.")
    if answer.status < 500 or kind in NOTHING_WRITTEN:
        # Nothing was written on the shard. An "event-exists" means the event is there
        # (a concurrent duplicate of this request, or an earlier attempt, made it): its
        # placement is right and stays.
        if placed_now and kind != "event-exists":
            await _unplace(store, event_id)
        if answer.status < 500:
            refused = CreateRefused(answer.status, kind, detail)
            if kind == "event-exists":
                refused.extra["eventId"] = event_id
            raise refused
        raise CreateFailed(kind, f"Shard {shard_name} could not take the event now ({kind}); "
                           "nothing was created: send the request again.", placed=False)
    log.warning("event creation: primary answered an unknown outcome",
                extra={"shard": shard_name, "status": answer.status, "kind": kind})
    raise CreateFailed(
        "shard-unavailable",
        f"Shard {shard_name}'s primary could not confirm the event ({kind}); event {event_id} is "
        "placed on it and may exist: send the same request, with this id, again to finish.",
        placed=True, eventId=event_id, shard=shard_name,
    )


def _header(headers: dict[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name), None)


async def _load(store: MapStore) -> RegionMap:
    try:
        return await store.load()
    except MapError as exc:
        raise _map_unavailable(exc) from None


async def _place(store: MapStore, event_id: str, shard_name: str,
                 requested: str | None) -> tuple[bool, str]:
    """Place a new event: (True, its shard). (False, its shard) when it is placed
    already, on the requested shard (or on any, when none was requested): the
    retry of an unfinished creation, or a duplicate the shard will refuse."""
    try:
        await store.place_event(event_id, shard_name, 0)
        return True, shard_name
    except CasConflict:
        placed_on = await _placement(store, event_id)
    except MapError as exc:
        raise _map_unavailable(exc) from None
    if requested is not None and placed_on != requested:
        raise CreateRefused(409, "event-exists",
                            f"Event {event_id} is already placed on shard {placed_on}.",
                            eventId=event_id, shard=placed_on)
    return False, placed_on


async def _placement(store: MapStore, event_id: str) -> str:
    try:
        placed_on, _ = await store.read_placement(event_id)
    except NotFound:  # removed again meanwhile: a rival attempt was refused
        raise CreateRefused(409, "conflict", f"Event {event_id} is being created concurrently.",
                            retry_after=1, eventId=event_id) from None
    except MapError as exc:
        raise _map_unavailable(exc) from None
    return placed_on


async def _unplace(store: MapStore, event_id: str) -> None:
    """Undo a placement this attempt wrote, its event refused by the shard."""
    try:
        _, index = await store.read_placement(event_id)
        await store.unplace_event(event_id, index)
    except MapError as exc:  # a placement of a missing event routes to 404s only
        log.warning("could not remove the placement of an event its shard refused",
                    extra={"event_id": event_id, "error": str(exc)})


def _map_unavailable(exc: MapError) -> CreateFailed:
    log.warning("region map write failed", extra={"error": str(exc)})
    return CreateFailed("map-unavailable",
                        "The region map cannot be reached now; nothing was created.", placed=False)
