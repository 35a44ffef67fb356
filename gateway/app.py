"""The regional gateway: routes every `/api` call to the right booking service.

- Writes for an event go to its shard's primary booking service (home region).
- Reads go to the shard's copy nearest to the client's region, falling back to
  the next nearest healthy copy, and to the primary when a consistency token
  asks for a position the replica has not replayed yet.
- The region map comes from Consul through a `MapWatcher`, held in memory;
  the gateway keeps serving with the last map it saw while Consul is down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from common.api import (
    IDEMPOTENCY_KEY_HEADER,
    MAX_BODY_BYTES,
    parse_booking_request,
    parse_event_spec,
    parse_limit,
    read_json_object,
    require_uuid,
)
from common.auth import admin_auth_middleware, operator_authenticated, require_operator
from common.cursor import Cursor, decode_cursor
from common.fencing import EPOCH_HEADER
from common.ids import routing_prefix
from common.logs import request_id_middleware
from common.metrics import metrics_middleware
from common.problems import Problem, problem_middleware
from gateway import consistency, telemetry
from gateway.consistency import ConsistencyToken
from gateway.console import add_console_routes
from gateway.drills_api import add_drill_routes
from gateway.listing import list_placed_events
from gateway.operator_api import add_operator_routes
from gateway.protection import ProtectionSettings, gateway_protection
from gateway.ride_through import RideThrough
from gateway.routing import REGION_HEADER, ClientRule, client_region, read_order
from gateway.upstream import Upstreams, UpstreamUnavailable
from gateway.writes import WriteForwarder, internal_idempotency_key
from region_map import (
    CasConflict,
    HealthWatcher,
    MapError,
    MapStore,
    MapWatcher,
    NotFound,
    RegionMap,
    Shard,
    ShardMember,
)

log = logging.getLogger("boxoffice.gateway")

LSN_HEADER = "X-Boxoffice-Lsn"
MIN_LSN_HEADER = "X-Boxoffice-Min-Lsn"
SERVED_BY_HEADER = "X-Boxoffice-Served-By"
GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")
STATIC_DIR = Path(__file__).with_name("static")
UPSTREAM_TIMEOUT_SECONDS = 5.0  # one operator call to a booking service


@dataclass
class GatewayConfig:
    region: str
    client_rules: list[ClientRule] = field(default_factory=list)
    address_rewrites: dict[str, str] = field(default_factory=dict)
    admin_token: str | None = None
    cache_ttl_seconds: float = 1.0
    # How long a write is retried (under its idempotency key, so it books at most
    # once) while the shard's primary does not answer or answers 503.
    write_retry_seconds: float = 10.0  # longer than the worst failover (MISSION §5)
    # One attempt of a write; the booking service gets a deadline a little shorter.
    write_attempt_seconds: float = 2.0
    # The secret every gateway shares to authenticate consistency tokens
    # (BOXOFFICE_TOKEN_SECRET; `boxoffice up` generates one).
    token_secret: bytes = b""
    cookie_secure: bool = False
    # Set to the parent domain of every region's gateway host (e.g. ".tickets.example")
    # so browsers carry the consistency token to every region.
    cookie_domain: str | None = None
    # Per-client booking rate limit and load shedding (gateway/protection.py); off by default.
    protection: ProtectionSettings = field(default_factory=ProtectionSettings)


@dataclass
class _Cached:
    expires: float
    status: int
    body: bytes


class Gateway:
    def __init__(self, config: GatewayConfig, store: MapStore, watcher: MapWatcher,
                 health: HealthWatcher | None = None) -> None:
        self.config = config
        self.store = store
        self.watcher = watcher
        self.service_health = health
        self.upstreams = Upstreams(config.address_rewrites)
        self.writes = WriteForwarder(
            self.upstreams, self._shard_for_event,
            retry_seconds=config.write_retry_seconds, attempt_seconds=config.write_attempt_seconds,
            ride=RideThrough(watcher),
        )
        self.cache: dict[str, _Cached] = {}

    # -- map helpers -------------------------------------------------------
    @property
    def map(self) -> RegionMap:
        current = self.watcher.current
        if current is None:
            raise Problem(503, "map-unavailable", "The region map has not been loaded yet.",
                          headers={"Retry-After": "1"})
        return current

    def _shard_for_event(self, event_id: uuid.UUID) -> Shard:
        shard = self.map.shard_for_event(str(event_id))
        if shard is None:
            raise Problem(404, "event-not-found", f"No event with id {event_id}.")
        return shard

    def _origin(self, request: web.Request) -> str:
        region_map = self.map
        return client_region(
            request.headers.get(REGION_HEADER),
            request.remote,
            self.config.client_rules,
            list(region_map.regions),
            self.config.region,
        )

    def _token(self, request: web.Request) -> ConsistencyToken:
        headers = request.headers
        if consistency.HEADER_NAME not in headers and "Cookie" not in headers:
            return ConsistencyToken()  # the common anonymous read: nothing to parse
        secret = self.config.token_secret
        return ConsistencyToken.parse(request.headers.get(consistency.HEADER_NAME), secret).merge(
            ConsistencyToken.parse(request.cookies.get(consistency.COOKIE_NAME), secret)
        )

    def _failing(self, member: ShardMember) -> bool:
        """Consul's health checks fail for this copy (its booking service, or its database)."""
        return self.service_health is not None and self.service_health.failing(member.service_url)

    # -- forwarding ----------------------------------------------------------
    async def _read(
        self,
        request: web.Request,
        shard: Shard,
        path: str,
        params: dict[str, str] | None = None,
        *,
        retry_missing_on_primary: bool = False,
    ) -> web.Response:
        """Read from the nearest copy that can answer.

        A replica that is behind the client's consistency token (it waited briefly,
        then said 503), failing, or missing a row the map says exists (404 with
        `retry_missing_on_primary`) sends the read to the primary next, which is
        never behind; after that, the remaining copies nearest first. A 404 is
        still the answer when no other copy can be reached.
        """
        wanted = self._token(request).position(shard.name)
        candidates = read_order(self.map, shard, self._origin(request), self._failing)
        last_error = "no copy of the shard is reachable"
        not_found: web.Response | None = None
        defects = 0  # copies that answered with a 5xx other than 503 (a defect, not health)
        while candidates and defects < 2:
            member = candidates.pop(0)
            is_primary = member.key == shard.primary_copy
            # Also to the copy the map names primary: a real primary answers at once, and
            # an old primary (this gateway's map may be behind) refuses, so a stale map
            # never serves a consistency token from a fenced copy.
            headers = {MIN_LSN_HEADER: wanted} if wanted else {}
            try:
                resp = await self.upstreams.request(
                    "GET", member.service_url, path, params=params, headers=headers, timeout=2.0
                )
            except UpstreamUnavailable as exc:
                last_error = str(exc)
                continue
            missing = resp.status == 404 and retry_missing_on_primary and not is_primary
            if resp.status < 500 and not missing:
                return self._relay(resp, served_by=member.key)
            if missing:
                not_found = self._relay(resp, served_by=member.key)
            else:
                last_error = f"{member.region}: {resp.status} {resp.body[:200]!r}"
                defects += resp.status != 503
            if not is_primary:  # the primary goes next (a stable sort keeps the rest in order)
                candidates.sort(key=lambda m: (self._failing(m), m.key != shard.primary_copy))
        if not_found is not None:
            return not_found
        log.warning("no copy could answer a read", extra={"shard": shard.name, "error": last_error})
        raise Problem(503, "shard-unavailable", f"No copy of shard {shard.name} can answer now.",
                      headers={"Retry-After": "1"})

    def _relay(self, resp: Any, served_by: str, extra: dict[str, str] | None = None) -> web.Response:
        headers = {SERVED_BY_HEADER: served_by}
        for name in ("Location", "Retry-After"):
            if name in resp.headers:
                headers[name] = resp.headers[name]
        headers.update(extra or {})
        return web.Response(
            status=resp.status, body=resp.body, headers=headers,
            content_type=resp.content_type or "application/json",
        )

    async def _write(
        self, request: web.Request, event_id: uuid.UUID, path: str, body: Any,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        """Send a write to the event's primary (gateway/writes.py: deadlines, retries)."""
        outcome = await self.writes.send(event_id, path, body, headers)
        if outcome.response.status == 503:
            return self._relay(outcome.response, served_by=outcome.shard.primary_copy)
        return self._with_token(request, outcome.response, outcome.shard)

    def _with_token(self, request: web.Request, resp: Any, shard: Shard) -> web.Response:
        lsn = resp.headers.get(LSN_HEADER)
        extra: dict[str, str] = {}
        token = self._token(request)
        if lsn and resp.status < 300:
            try:
                token.advance(shard.name, consistency.lsn_to_int(lsn))
            except ValueError:
                pass
        serialized = token.serialize(self.config.token_secret) if token else ""
        if token:
            extra[consistency.HEADER_NAME] = serialized
        response = self._relay(resp, served_by=shard.primary_copy, extra=extra)
        if token:
            response.set_cookie(
                consistency.COOKIE_NAME, serialized, max_age=3600, path="/",
                httponly=True, samesite="Lax", secure=self.config.cookie_secure,
                domain=self.config.cookie_domain,
            )
        return response

    # -- public API ------------------------------------------------------------
    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "region": self.config.region})

    async def ready(self, request: web.Request) -> web.Response:
        """Readiness: the map is loaded. Anyone gets the status; the detail (map index,
        breakers, failing copies, settings) needs the operator token."""
        current = self.watcher.current
        status = 200 if current is not None else 503
        if not operator_authenticated(request, self.config.admin_token):
            return web.json_response({"status": "ok" if current is not None else "not-ready"},
                                     status=status)
        breakers = {k: ("open" if b.open else "closed") for k, b in self.upstreams.breakers.items()}
        body = {
            "status": "ok" if current is not None else "not-ready",
            "region": self.config.region,
            "map": {
                "loaded": current is not None,
                "index": current.index if current else None,
                "consulReachable": self.watcher.healthy,
                "shards": len(current.shards) if current else 0,
                "events": len(current.placements) if current else 0,
            },
            "upstreamBreakers": breakers,
            "failingServices": sorted(
                i.instance_id for i in (self.service_health.instances if self.service_health else [])
                if not i.passing),
            "settings": {
                "cacheTtlSeconds": self.config.cache_ttl_seconds,
                "writeRetrySeconds": self.config.write_retry_seconds,
                "writeAttemptSeconds": self.config.write_attempt_seconds,
            },
        }
        return web.json_response(body, status=status)

    async def list_events(self, request: web.Request) -> web.Response:
        limit = parse_limit(request.query.get("limit"))
        after = decode_cursor(request.query.get("cursor"))  # a bad cursor never fans out
        cache_key = f"events:{limit}:{after.encode() if after else ''}"
        if not self._token(request) and (hit := self._cached(cache_key)):
            return hit

        async def read(shard: Shard, cursor: Cursor | None, page_limit: int) -> dict[str, Any]:
            params = {"limit": str(page_limit)}
            if cursor is not None:
                params["cursor"] = cursor.encode()  # canonical: never the client's bytes
            resp = await self._read(request, shard, "/api/events", params)
            if resp.status != 200:
                raise Problem(503, "shard-unavailable", f"Shard {shard.name} could not list events.")
            assert isinstance(resp.body, bytes)
            return dict(json.loads(resp.body))

        page = await list_placed_events(read, self.map, limit, after)
        body = json.dumps(page.to_json()).encode()
        self._store(cache_key, 200, body)
        return web.Response(body=body, content_type="application/json")

    async def get_event(self, request: web.Request) -> web.Response:
        event_id = require_uuid(request.match_info["event_id"], "event")
        shard = self._shard_for_event(event_id)
        # The map says the event exists: a replica's 404 only means it is behind.
        resp = await self._read(request, shard, f"/api/events/{event_id}", retry_missing_on_primary=True)
        if resp.status != 200:
            return resp
        assert isinstance(resp.body, bytes)
        event = json.loads(resp.body)
        event["shard"] = shard.name
        event["homeRegion"] = shard.primary_region
        resp.body = json.dumps(event).encode()
        return resp

    async def list_tiers(self, request: web.Request) -> web.Response:
        event_id = require_uuid(request.match_info["event_id"], "event")
        shard = self._shard_for_event(event_id)
        return await self._read(
            request, shard, f"/api/events/{event_id}/ticket-tiers", retry_missing_on_primary=True
        )

    async def create_booking(self, request: web.Request) -> web.Response:
        """Book, under the client's reference or an idempotency key of ours. A client
        that sent no reference gets our key in `Idempotency-Key` on every answer
        (503s included): sending the request again with it replays, never books twice."""
        key = internal_idempotency_key()
        internal = IDEMPOTENCY_KEY_HEADER not in request.headers  # as far as we know yet
        try:
            body = await read_json_object(request)
            internal = internal and body.get("clientReference") is None
            booking = parse_booking_request(body, request.headers.get(IDEMPOTENCY_KEY_HEADER))
            forwarded = booking.to_json()
            if internal:
                forwarded["clientReference"] = key
            response = await self._write(request, booking.event_id, "/api/bookings", forwarded)
        except Problem as problem:
            if internal:
                problem.headers.setdefault(IDEMPOTENCY_KEY_HEADER, key)
            raise
        if internal:
            response.headers[IDEMPOTENCY_KEY_HEADER] = key
            if response.status == 200:
                # A replay of our own retry: for this client the booking was just created.
                response.set_status(201)
        return response

    def _shard_for_booking(self, booking_id: uuid.UUID) -> tuple[uuid.UUID, Shard]:
        event_id = self.map.event_for_prefix(routing_prefix(booking_id))
        if event_id is None:
            raise Problem(404, "booking-not-found", f"No booking with id {booking_id}.")
        return uuid.UUID(event_id), self._shard_for_event(uuid.UUID(event_id))

    async def get_booking(self, request: web.Request) -> web.Response:
        booking_id = require_uuid(request.match_info["booking_id"], "booking")
        _, shard = self._shard_for_booking(booking_id)
        return await self._read(
            request, shard, f"/api/bookings/{booking_id}", retry_missing_on_primary=True
        )

    async def cancel_booking(self, request: web.Request) -> web.Response:
        booking_id = require_uuid(request.match_info["booking_id"], "booking")
        event_id, _ = self._shard_for_booking(booking_id)
        return await self._write(request, event_id, f"/api/bookings/{booking_id}/cancel", None)

    # -- operator API ----------------------------------------------------------
    async def admin_map(self, request: web.Request) -> web.Response:
        require_operator(request, self.config.admin_token)
        return web.json_response(self.map.to_json())

    async def admin_create_event(self, request: web.Request) -> web.Response:
        """Create an event with tiers on a chosen shard (or the least loaded) and place it.

        The placement is written first (check-and-set create): the map is what routes,
        and a placement without its event only answers 404s, while an event without a
        placement would be listed but not bookable. Then the shard's primary creates
        the event. A definitive refusal there removes the placement again; an unknown
        outcome (the primary did not answer) keeps it, and sending the same request
        (same id) again finishes the creation on the placed shard.
        """
        require_operator(request, self.config.admin_token)
        body = await read_json_object(request)
        spec = parse_event_spec(body)
        event_id = str(spec.id)
        region_map = self.map
        requested = body.get("shard")
        if requested is not None and (not isinstance(requested, str)
                                      or requested not in region_map.shards):
            raise Problem(400, "invalid-request", f"Unknown shard {requested!r}.")
        sharing = region_map.event_for_prefix(routing_prefix(spec.id))
        if sharing is not None and sharing != event_id:
            raise Problem(
                409, "event-id-prefix-taken",
                f"Event {sharing} already starts with the same 8 bytes as {event_id}; booking "
                "ids are routed by them, so choose another id (or let the platform choose).",
            )
        placed_now, shard_name = await self._place(
            event_id, requested or self._least_loaded_shard(region_map), requested)
        shard = self.map.shards.get(shard_name)
        if shard is None:
            raise Problem(409, "event-exists",
                          f"Event {event_id} is already placed, on unknown shard {shard_name}.")
        primary = shard.primary
        try:
            resp = await self.upstreams.request(
                "POST", primary.service_url, "/admin/events", json_body=spec.to_json(),
                headers={"Authorization": request.headers["Authorization"],
                         EPOCH_HEADER: str(shard.epoch)},
                timeout=UPSTREAM_TIMEOUT_SECONDS,
            )
        except UpstreamUnavailable as exc:
            log.warning("event creation: primary did not answer",
                        extra={"shard": shard_name, "error": str(exc)})
            raise Problem(
                503, "shard-unavailable",
                f"Shard {shard_name}'s primary did not answer; event {event_id} is "
                "placed on it but may not exist yet: send the same request, with this id, "
                "again to finish.",
                headers={"Retry-After": "1"}, eventId=event_id, shard=shard_name,
            ) from None
        if resp.status != 201:
            if placed_now and not _event_exists(resp):
                await self._unplace(event_id)
            # (The event exists on the placed shard: a concurrent duplicate of this
            # request created it, or an earlier attempt did. Its placement is right.)
            return self._relay(resp, served_by=shard.primary_copy)
        # Answer once this gateway routes the event (bounded: created and placed it is,
        # and the map in memory catches up on its own).
        with contextlib.suppress(TimeoutError):
            await self.watcher.wait_for(lambda m: m.shard_for_event(event_id) is not None, 5.0)
        doc = json.loads(resp.body)
        doc["shard"] = shard_name
        doc["homeRegion"] = shard.primary_region
        return self._with_token(request, _Json(201, doc, resp.headers), shard)

    @staticmethod
    def _least_loaded_shard(region_map: RegionMap) -> str:
        counts = {name: 0 for name in region_map.shards}
        for placement_shard in region_map.placements.values():
            if placement_shard in counts:
                counts[placement_shard] += 1
        return min(counts, key=lambda n: (counts[n], n))

    async def _place(
        self, event_id: str, shard_name: str, requested: str | None
    ) -> tuple[bool, str]:
        """Place a new event: (True, its shard). (False, its shard) when it is placed
        already, on the requested shard (or on any, when none was requested): the
        retry of an unfinished creation, or a duplicate the shard will refuse."""
        try:
            await self.store.place_event(event_id, shard_name, 0)
            return True, shard_name
        except CasConflict:
            placed_on = await self._placement(event_id)
        except MapError as exc:
            raise _map_unwritable(exc) from None
        if requested is not None and placed_on != requested:
            raise Problem(409, "event-exists",
                          f"Event {event_id} is already placed on shard {placed_on}.")
        return False, placed_on

    async def _placement(self, event_id: str) -> str:
        try:
            placed_on, _ = await self.store.read_placement(event_id)
        except NotFound:  # removed again meanwhile: a rival attempt was refused
            raise Problem(409, "conflict", f"Event {event_id} is being created concurrently.",
                          headers={"Retry-After": "1"}) from None
        except MapError as exc:
            raise _map_unwritable(exc) from None
        return placed_on

    async def _unplace(self, event_id: str) -> None:
        """Undo a placement this request wrote, its event refused by the shard."""
        try:
            _, index = await self.store.read_placement(event_id)
            await self.store.unplace_event(event_id, index)
        except MapError as exc:  # a placement of a missing event routes to 404s only
            log.warning("could not remove the placement of an event its shard refused",
                        extra={"event_id": event_id, "error": str(exc)})

    # -- tiny response cache for anonymous listing reads -----------------------
    def _cached(self, key: str) -> web.Response | None:
        hit = self.cache.get(key)
        if hit is None or hit.expires < time.monotonic():
            return None
        return web.Response(status=hit.status, body=hit.body, content_type="application/json")

    def _store(self, key: str, status: int, body: bytes) -> None:
        if self.config.cache_ttl_seconds > 0:
            if len(self.cache) > 1000:
                self.cache.clear()
            self.cache[key] = _Cached(time.monotonic() + self.config.cache_ttl_seconds, status, body)

    # -- web page --------------------------------------------------------------
    async def index(self, _: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/api/health", self.health)
        r.add_get("/api/ready", self.ready)
        r.add_get("/api/events", self.list_events)
        r.add_get("/api/events/{event_id}", self.get_event)
        r.add_get("/api/events/{event_id}/ticket-tiers", self.list_tiers)
        r.add_post("/api/bookings", self.create_booking)
        r.add_get("/api/bookings/{booking_id}", self.get_booking)
        r.add_post("/api/bookings/{booking_id}/cancel", self.cancel_booking)
        r.add_get("/admin/map", self.admin_map)
        r.add_post("/admin/events", self.admin_create_event)


@dataclass
class _Json:
    status: int
    doc: dict[str, Any]
    headers: Any
    content_type: str = "application/json"

    @property
    def body(self) -> bytes:
        return json.dumps(self.doc).encode()


def _event_exists(resp: Any) -> bool:
    """Is this a booking service's "event-exists" refusal?"""
    if resp.status != 409:
        return False
    try:
        return str(json.loads(resp.body).get("type", "")).endswith("/event-exists")
    except (ValueError, AttributeError):
        return False


def _map_unwritable(exc: MapError) -> Problem:
    log.warning("region map write failed", extra={"error": str(exc)})
    return Problem(503, "map-unavailable",
                   "The region map cannot be reached now; nothing was created.",
                   headers={"Retry-After": "1"})


def create_app(config: GatewayConfig, store: MapStore, watcher: MapWatcher,
               health: HealthWatcher | None = None) -> web.Application:
    gateway = Gateway(config, store, watcher, health)
    protection = gateway_protection(config.protection)
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[request_id_middleware, metrics_middleware("gateway"), problem_middleware,
                     admin_auth_middleware(config.admin_token), *protection.middlewares],
    )
    app.cleanup_ctx.append(protection.lifecycle)
    gateway.routes(app)
    add_operator_routes(app, store, config.admin_token)
    add_console_routes(app, store, watcher, health, config.region, config.admin_token, config.cookie_secure)
    add_drill_routes(app, store, config.admin_token, lambda: watcher.current,
                     gateway.upstreams.physical_url)

    async def lifecycle(_: web.Application):  # type: ignore[no-untyped-def]
        await gateway.upstreams.start()
        await watcher.start()
        if health is not None:
            await health.start()
        yield
        if health is not None:
            await health.stop()
        await watcher.stop()
        await gateway.upstreams.close()
        await store.close()

    app.cleanup_ctx.append(lifecycle)
    telemetry.install(app, gateway)
    app[GATEWAY_KEY] = gateway
    return app

