"""The gateway's operator routes for events (the operator token, as every /admin route).

    POST /admin/events   an event spec, plus optional "shard" and "venueRegion"
        -> 201 the event with its tiers, "shard" and "homeRegion" (event_ops/create.py);
           400 a bad spec, an unknown shard or venue region; 409 a conflict (the id is
           taken, or its booking-routing prefix, or a tier id; a concurrent creation);
           503 a dependency failed (`placed`: send the same request again to finish).
    GET /admin/events[?shard=S]
        -> 200 {"mapIndex", "shards": [{"shard", "primary", "unreadable", "counts",
           "events": [{"id", "status", "placedOn", "name", "venue", "startsAt"}]}]}
           (event_ops/listing.py), by the map as Consul has it (this gateway's copy
           while Consul does not answer); 400 an unknown shard.

With no "shard" and no "venueRegion", an event goes to the shard homed nearest this
gateway's region (the least loaded of those). The work is event_ops', which the CLI
(`boxoffice event create|list`) runs too; this module maps its outcomes to HTTP. A
creation, once started, is not cancelled by a client that hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiohttp import web

from common.api import read_json_object
from common.auth import require_operator
from common.problems import Problem
from event_ops.create import CreatedEvent, CreateFailed, CreateRefused, create_event, parse_create_request
from event_ops.listing import UnknownShard, list_events
from event_ops.shard_admin import ShardAdmin
from region_map import MapError, MapStore, MapWatcher, RegionMap

log = logging.getLogger("boxoffice.gateway")

MAP_CATCH_UP_SECONDS = 5.0  # how long a 201 waits for this gateway's map to route the event

# Sets the consistency token (header and cookie) on a response: (request, response,
# shard, commit position) -> None; the gateway's own (gateway/app.py).
StampToken = Callable[[web.Request, web.Response, str, str | None], None]


class EventsApi:
    def __init__(self, store: MapStore, watcher: MapWatcher, current_map: Callable[[], RegionMap],
                 admin: ShardAdmin, region: str, token: str | None, stamp: StampToken) -> None:
        self.store = store
        self.watcher = watcher
        self.current_map = current_map  # raises a 503 problem while no map is loaded
        self.admin = admin
        self.region = region
        self.token = token
        self.stamp = stamp

    async def create(self, request: web.Request) -> web.Response:
        require_operator(request, self.token)
        body = await read_json_object(request)
        try:
            create = parse_create_request(body)
            task = asyncio.ensure_future(create_event(
                self.store, self.admin, create, region_map=self.current_map(),
                default_venue_region=self.region))
            created: CreatedEvent = await asyncio.shield(task)
        except CreateRefused as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
            raise Problem(exc.status, exc.kind, exc.detail, headers=headers, **exc.extra) from None
        except CreateFailed as exc:
            raise Problem(503, exc.kind, exc.detail, headers={"Retry-After": "1"},
                          placed=exc.placed, **exc.extra) from None
        # Answer once this gateway routes the event (bounded: created and placed it is,
        # and the map in memory catches up on its own).
        with contextlib.suppress(TimeoutError):
            await self.watcher.wait_for(lambda m: m.shard_for_event(created.event_id) is not None,
                                        MAP_CATCH_UP_SECONDS)
        response = web.json_response(created.to_json(), status=201)
        self.stamp(request, response, created.shard, created.lsn)
        return response

    async def list(self, request: web.Request) -> web.Response:
        require_operator(request, self.token)
        shard = request.query.get("shard")
        try:  # the placements as Consul has them now; this gateway's copy while it is down
            region_map = await self.store.load()
        except MapError as exc:
            log.warning("event listing: region map unreadable, listing by the map in memory",
                        extra={"error": str(exc)})
            region_map = self.current_map()
        try:
            listing = await list_events(self.admin, region_map, shard)
        except UnknownShard as exc:
            raise Problem(400, "invalid-request", f"Unknown shard {exc.shard[:100]!r}.",
                          errors=[{"field": "shard", "detail": "unknown shard"}]) from None
        return web.json_response(listing.to_json())


def add_event_routes(app: web.Application, api: EventsApi) -> None:
    """Register the routes on `app` (called from gateway.app.create_app)."""
    app.router.add_post("/admin/events", api.create)
    app.router.add_get("/admin/events", api.list)
