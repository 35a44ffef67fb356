"""The regional gateway: routes every `/api` call to the right booking service.

- Writes for an event go to its shard's primary booking service (home region).
- Reads go to the shard's copy nearest to the client's region, falling back to
  the next nearest healthy copy, and to the primary when a consistency token
  asks for a position the replica has not replayed yet.
- The region map comes from Consul through a `MapWatcher`, held in memory;
  the gateway keeps serving with the last map it saw while Consul is down.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from common.api import (
    BOOKING_SECRET_HEADER,
    IDEMPOTENCY_KEY_HEADER,
    MAX_BODY_BYTES,
    parse_booking_request,
    parse_booking_secret,
    parse_limit,
    read_json_object,
    require_uuid,
)
from common.auth import admin_auth_middleware, operator_authenticated, require_operator
from common.cursor import Cursor, decode_cursor
from common.ids import routing_prefix
from common.logs import request_id_middleware
from common.lsn import lsn_to_int
from common.metrics import metrics_middleware
from common.problems import Problem, problem_middleware
from event_ops.shard_admin import ShardAdmin
from gateway import consistency, telemetry
from gateway.consistency import ConsistencyToken
from gateway.console import add_console_routes
from gateway.drills_api import add_drill_routes
from gateway.events_api import EventsApi, add_event_routes
from gateway.listing import list_placed_events
from gateway.listing_cache import ListingCache, cache_control
from gateway.moves_api import add_move_routes
from gateway.openapi import add_api_doc_routes
from gateway.operator_api import add_operator_routes
from gateway.protection import ProtectionSettings, gateway_protection
from gateway.ride_through import RideThrough, moved_to
from gateway.routing import REGION_HEADER, ClientRule, client_region, read_order
from gateway.upstream import UpstreamResponse, Upstreams, UpstreamUnavailable
from gateway.writes import (
    MAX_MOVED_HOPS,
    WriteForwarder,
    booking_secret,
    internal_idempotency_key,
    not_the_buyers,
)
from region_map import (
    HealthWatcher,
    MapStore,
    MapWatcher,
    RegionMap,
    Shard,
    ShardMember,
)

log = logging.getLogger("boxoffice.gateway")

LSN_HEADER = "X-Boxoffice-Lsn"
MIN_LSN_HEADER = "X-Boxoffice-Min-Lsn"
MIN_EPOCH_HEADER = "X-Boxoffice-Min-Epoch"  # the token entry's epoch (gateway/consistency.py)
SERVED_BY_HEADER = "X-Boxoffice-Served-By"
GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")
STATIC_DIR = Path(__file__).with_name("static")


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
            ride=RideThrough(watcher), shard_named=lambda name: self.map.shards.get(name),
        )
        # Operator calls to booking services (event creation and listing), over the same
        # simulated network as the gateway's own calls.
        self.shard_admin = ShardAdmin(config.admin_token or "",
                                      address_rewrites=config.address_rewrites)
        self.listing_cache = ListingCache(config.cache_ttl_seconds)

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
        moved_hops: int = 0,
        extra_headers: dict[str, str] | None = None,
    ) -> web.Response:
        """Read from the nearest copy that can answer.

        A replica that is behind the client's consistency token (it waited briefly,
        then said 503), failing, or missing a row the map says exists (404 with
        `retry_missing_on_primary`) sends the read to the primary next, which is
        never behind; after that, the remaining copies nearest first. A 404 is
        still the answer when no other copy can be reached.

        Moves (docs/moves.md): a copy of a shard events were moved onto must also have
        replayed the latest of their placements' `sinceLsn` (`_wanted_position`). A copy
        that answers 421 `event-moved` (this gateway's map is behind a move) names the
        shard that has the event: the read goes to that shard's primary, which cannot be
        behind.
        """
        wanted, wanted_epoch = self._wanted_position(request, shard)
        candidates = read_order(self.map, shard, self._origin(request), self._failing)
        if moved_hops:
            candidates = [shard.primary]
        last_error = "no copy of the shard is reachable"
        not_found: web.Response | None = None
        defects = 0  # copies that answered with a 5xx other than 503 (a defect, not health)
        while candidates and defects < 2:
            member = candidates.pop(0)
            is_primary = member.key == shard.primary_copy
            # Also to the copy the map names primary: a real primary answers at once, and
            # an old primary (this gateway's map may be behind) refuses, so a stale map
            # never serves a consistency token from a fenced copy.
            headers = {**(extra_headers or {}), **({MIN_LSN_HEADER: wanted} if wanted else {})}
            if wanted and wanted_epoch:  # a copy on an older epoch's history must refuse
                headers[MIN_EPOCH_HEADER] = str(wanted_epoch)
            try:
                resp = await self.upstreams.request(
                    "GET", member.service_url, path, params=params, headers=headers, timeout=2.0
                )
            except UpstreamUnavailable as exc:
                last_error = str(exc)
                continue
            if resp.status == 421 and moved_hops < MAX_MOVED_HOPS:
                moved_to = self._moved_to(resp, shard)
                if moved_to is not None:
                    return await self._read(request, moved_to, path, params,
                                            retry_missing_on_primary=retry_missing_on_primary,
                                            moved_hops=moved_hops + 1,
                                            extra_headers=extra_headers)
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

    def _wanted_position(self, request: web.Request, shard: Shard) -> tuple[str | None, int]:
        """The position a copy of `shard` must have replayed to serve this read, and the
        epoch whose history it is on (0: any): the client's consistency token's entry, or
        the latest `sinceLsn` of the events moved onto the shard (docs/moves.md: a copy
        behind it may lack a moved event's rows, or show its tiers as they were before the
        last copy), whichever is later. The token's epoch goes along either way: a copy
        must be on that epoch's history (or a later one) to serve the read at all."""
        token = self._token(request)
        wanted, epoch = token.position(shard.name), token.epoch(shard.name)
        moved = self.map.moved_since_lsn(shard.name)  # well-formed: the map drops any other
        if moved is not None and (wanted is None or lsn_to_int(wanted) < lsn_to_int(moved)):
            return moved, epoch
        return wanted, epoch

    def _moved_to(self, resp: UpstreamResponse, shard: Shard) -> Shard | None:
        """The shard an `event-moved` answer names, when this map knows it (not `shard`)."""
        named = moved_to(resp.status, resp.body)
        found = self.map.shards.get(named) if named is not None else None
        return found if found is not None and found.name != shard.name else None

    def _relay(self, resp: UpstreamResponse, served_by: str,
               extra: dict[str, str] | None = None) -> web.Response:
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

    def _with_token(self, request: web.Request, resp: UpstreamResponse, shard: Shard) -> web.Response:
        response = self._relay(resp, served_by=shard.primary_copy)
        self.stamp_token(request, response, shard.name, resp.headers.get(LSN_HEADER), shard.epoch)
        return response

    def stamp_token(self, request: web.Request, response: web.Response, shard: str,
                    lsn: str | None, epoch: int | None = None) -> None:
        """Hand back the client's consistency token, advanced to `lsn` on `shard` when the
        write succeeded: as a response header and as a cookie. `epoch` is the shard epoch
        the write was routed by (the database committed it under that epoch or a later
        one); None: this gateway's map's epoch of the shard now, which is no earlier (a
        write answered 2xx was confirmed, so it is in every later epoch's history)."""
        token = self._token(request)
        if lsn and response.status < 300:
            if epoch is None:
                record = self.watcher.current.shards.get(shard) if self.watcher.current else None
                epoch = record.epoch if record is not None else 0
            try:
                token.advance(shard, lsn_to_int(lsn), epoch)
            except ValueError:
                pass
        if not token:
            return
        serialized = token.serialize(self.config.token_secret)
        response.headers[consistency.HEADER_NAME] = serialized
        response.set_cookie(
            consistency.COOKIE_NAME, serialized, max_age=3600, path="/",
            httponly=True, samesite="Lax", secure=self.config.cookie_secure,
            domain=self.config.cookie_domain,
        )

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
            "listingCache": {"entries": len(self.listing_cache), **self.listing_cache.stats.to_json()},
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
        """A page of every shard's placed events. Anonymous pages come from the listing
        cache (gateway/listing_cache.py: shared fetches, LRU, `cache_ttl_seconds`); a
        page read with a valid consistency token goes past it to copies that have
        replayed the client's writes. A client that carries a token (valid or not)
        gets `Cache-Control: private, no-store`, others `public, max-age=<fresh for>`."""
        limit = parse_limit(request.query.get("limit"))
        after = decode_cursor(request.query.get("cursor"))  # a bad cursor never fans out

        async def read(shard: Shard, cursor: Cursor | None, page_limit: int) -> dict[str, Any]:
            params = {"limit": str(page_limit)}
            if cursor is not None:
                params["cursor"] = cursor.encode()  # canonical: never the client's bytes
            resp = await self._read(request, shard, "/api/events", params)
            if resp.status != 200:
                raise Problem(503, "shard-unavailable", f"Shard {shard.name} could not list events.")
            assert isinstance(resp.body, bytes)
            return dict(json.loads(resp.body))

        async def fetch() -> bytes:
            page = await list_placed_events(read, self.map, limit, after)
            return json.dumps(page.to_json()).encode()

        personal = (consistency.HEADER_NAME in request.headers
                    or consistency.COOKIE_NAME in request.cookies)
        if self._token(request):
            body, max_age = await fetch(), 0
        else:
            entry = await self.listing_cache.get(
                f"events:{limit}:{after.encode() if after else ''}", fetch)
            body, max_age = entry.body, entry.max_age(self.listing_cache.clock())
        return web.Response(body=body, content_type="application/json", headers={
            "Cache-Control": cache_control(personal, max_age),
            "Vary": f"Cookie, {consistency.HEADER_NAME}"})

    async def get_event(self, request: web.Request) -> web.Response:
        event_id = require_uuid(request.match_info["event_id"], "event")
        shard = self._shard_for_event(event_id)
        # The map says the event exists: a replica's 404 only means it is behind.
        resp = await self._read(request, shard, f"/api/events/{event_id}",
                                retry_missing_on_primary=True)
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
        (503s included): sending the request again with it replays, never books twice.
        The buyer's `Booking-Secret` (the client's, or one made here: gateway/writes.py)
        goes with every attempt and comes back on every answer."""
        secret, _ = booking_secret(request)
        key = internal_idempotency_key()
        internal = IDEMPOTENCY_KEY_HEADER not in request.headers  # as far as we know yet
        try:
            body = await read_json_object(request)
            internal = internal and body.get("clientReference") is None
            booking = parse_booking_request(body, request.headers.get(IDEMPOTENCY_KEY_HEADER))
            forwarded = booking.to_json()
            if internal:
                forwarded["clientReference"] = key
            response = await self._write(request, booking.event_id, "/api/bookings", forwarded,
                                         {BOOKING_SECRET_HEADER: secret})
        except Problem as problem:
            if internal:
                problem.headers.setdefault(IDEMPOTENCY_KEY_HEADER, key)
            problem.headers.setdefault(BOOKING_SECRET_HEADER, secret)
            problem.headers.setdefault("Cache-Control", "no-store")
            raise
        response.headers[BOOKING_SECRET_HEADER] = secret
        response.headers["Cache-Control"] = "no-store"
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
        """The full view, for the buyer's `Booking-Secret` only (else the 404 of an
        unknown id, gateway/writes.py `not_the_buyers`)."""
        booking_id = require_uuid(request.match_info["booking_id"], "booking")
        secret = parse_booking_secret(request.headers.get(BOOKING_SECRET_HEADER))
        _, shard = self._shard_for_booking(booking_id)
        if secret is None:
            raise not_the_buyers(booking_id)
        response = await self._read(
            request, shard, f"/api/bookings/{booking_id}", retry_missing_on_primary=True,
            extra_headers={BOOKING_SECRET_HEADER: secret})
        response.headers["Cache-Control"] = "no-store"
        return response

    async def cancel_booking(self, request: web.Request) -> web.Response:
        booking_id = require_uuid(request.match_info["booking_id"], "booking")
        secret = parse_booking_secret(request.headers.get(BOOKING_SECRET_HEADER))
        event_id, _ = self._shard_for_booking(booking_id)
        if secret is None:
            raise not_the_buyers(booking_id)
        return await self._write(request, event_id, f"/api/bookings/{booking_id}/cancel", None,
                                 {BOOKING_SECRET_HEADER: secret})

    # -- operator API ----------------------------------------------------------
    async def admin_map(self, request: web.Request) -> web.Response:
        require_operator(request, self.config.admin_token)
        return web.json_response(self.map.to_json())

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
    add_event_routes(app, EventsApi(store, watcher, lambda: gateway.map, gateway.shard_admin,
                                    config.region, config.admin_token, gateway.stamp_token))
    add_console_routes(app, store, watcher, health, config.region, config.admin_token, config.cookie_secure)
    add_move_routes(app, store, gateway.shard_admin)
    add_drill_routes(app, store, config.admin_token, lambda: watcher.current,
                     gateway.upstreams.physical_url)
    add_api_doc_routes(app)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await gateway.upstreams.start()
        await watcher.start()
        if health is not None:
            await health.start()
        yield
        if health is not None:
            await health.stop()
        await watcher.stop()
        await gateway.shard_admin.close()
        await gateway.upstreams.close()
        await store.close()

    app.cleanup_ctx.append(lifecycle)
    telemetry.install(app, gateway)
    app[GATEWAY_KEY] = gateway
    return app

