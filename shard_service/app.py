"""The booking service: one shard's API over its database.

It serves one copy of each of its shards (named by the copy's key in the
region map, `--shard member=`), read-write while that copy is the primary,
read-only while it is a replica: the role is derived at run time from the map
and the database (shard_service/roles.py), never from a start flag. It is the
only code that talks SQL. One process may serve several shards: each is
mounted under `/shards/<name>`; a process serving a single shard also answers
at the root (`/api/...`).

Writes (book, cancel, create an event) are fenced twice: refused (503
`not-primary`) unless the derived role is primary, and the epoch they carry
(`X-Boxoffice-Epoch` from the gateway, never lower than this service's map:
503 `stale-epoch`) is checked by the database itself against its epoch row,
in the same round trip (503 `fenced`). A write whose commit was not confirmed
by a synchronous standby (the wait was cancelled) is 503 `not-confirmed`,
never 201 (shard_service/sync_wait.py).

Bookings go to the database one CALL each, or, with batching on, through the
shard's combiner (shard_service/combiner.py): the requests that arrive while a
batch is in flight go together as the next batch, one CALL, one commit, one
synchronous wait, each request with its own answer.

Headers between gateway and service:
- `X-Boxoffice-Lsn` (response to a write): the WAL position at which the
  write is committed; the gateway turns it into a consistency token.
- `X-Boxoffice-Min-Lsn` (request for a read): wait briefly until this copy
  has replayed that position; if it cannot, answer 503 `replica-behind` so
  the gateway reads from the primary instead. A copy whose role is fenced or
  unknown answers such a read 503 at once: an old primary serves no read for
  a consistency token.
- `X-Boxoffice-Epoch` (request for a write): the shard epoch the gateway
  routed by (common/fencing.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg
from aiohttp import web
from asyncpg.pool import PoolConnectionProxy

from common.admission import SERVICE_DEFAULTS, ProtectionSettings, build_protection
from common.api import (
    IDEMPOTENCY_KEY_HEADER,
    MAX_BODY_BYTES,
    parse_booking_request,
    parse_event_spec,
    parse_limit,
    read_json_object,
    require_uuid,
)
from common.auth import (
    admin_auth_middleware,
    configured_token,
    operator_authenticated,
    require_operator,
)
from common.cursor import Cursor, decode_cursor, format_timestamp
from common.deadlines import Deadline
from common.fencing import EPOCH_HEADER, parse_epoch
from common.ids import new_booking_id
from common.logs import request_id_middleware
from common.metrics import metrics_middleware
from common.problems import Problem, problem_middleware
from region_map import MapStore, MapWatcher
from shard_service import audit, queries
from shard_service.combiner import BatchSettings, BookingCall, BookingCombiner, deadline_exceeded
from shard_service.connections import Connection, fetch_one
from shard_service.http import json_response as _json
from shard_service.http import raw_json as _raw_json
from shard_service.http import request_deadline as _deadline
from shard_service.moves import MoveHandlers, event_moved, event_moving, raise_if_moved
from shard_service.roles import Role, RoleTracker, RoleView
from shard_service.sync_wait import watch_sync_wait
from shard_service.telemetry import POOL_WAIT_SECONDS
from shard_service.telemetry import install as install_telemetry

log = logging.getLogger("boxoffice.shard_service")

LSN_HEADER = "X-Boxoffice-Lsn"
MIN_LSN_HEADER = "X-Boxoffice-Min-Lsn"
LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
READ_YOUR_WRITES_WAIT_MS = 250
POOL_CLOSE_TIMEOUT = 3.0  # seconds a stopping service waits for its pool connections

@dataclass(frozen=True)
class ShardConfig:
    """One shard copy this service serves: the shard, the copy's key in the shard
    record's members (`us-east`, `us-east/b`), and its database."""

    name: str
    dsn: str
    member: str
    pool_size: int = 20


class ShardHandlers:
    """The HTTP handlers of one shard, bound to its connection pool."""

    def __init__(self, config: ShardConfig, region: str, admin_token: str | None,
                 watcher: MapWatcher, batching: BatchSettings | None = None) -> None:
        self.config = config
        self.region = region
        self.admin_token = admin_token
        self.pool: asyncpg.Pool | None = None
        self.roles = RoleTracker(config.name, config.member, config.dsn, watcher)
        # Bookings committed in batches (shard_service/combiner.py), or one CALL each.
        self.combiner = (BookingCombiner(config.name, self._connection, batching)
                         if batching is not None and batching.enabled else None)

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        # min_size 0: connections are opened on demand, so the service starts (and answers
        # for its other copies, and says 503 for this one) while this copy's database is
        # down: a host's booking service must not depend on every server of the host.
        self.pool = await asyncpg.create_pool(
            self.config.dsn,
            min_size=0,
            max_size=self.config.pool_size,
            command_timeout=10,
            timeout=5,
            server_settings={"application_name": f"boxoffice-{self.config.name}"},
        )
        await self.roles.start()

    async def close(self) -> None:
        """Stop, within a bound: a pool whose connections are stuck (a database that
        stopped answering under a statement) is terminated, not waited for."""
        if self.combiner is not None:
            await self.combiner.close()
        await self.roles.stop()
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), POOL_CLOSE_TIMEOUT)
            except TimeoutError:
                log.warning("pool did not close in time: terminated", extra={"shard": self.config.name})
                self.pool.terminate()

    def _pool(self) -> asyncpg.Pool:
        if self.pool is None:
            raise Problem(503, "not-ready", "The booking service is starting.")
        return self.pool

    @contextlib.asynccontextmanager
    async def _connection(self, deadline: Deadline) -> AsyncIterator[PoolConnectionProxy]:
        """A pooled connection within the caller's deadline. Running out of time,
        waiting for the pool or in a statement (which is then cancelled, and rolls
        back), is a 503 `deadline-exceeded`: the caller has given up, so do we."""
        try:
            asked = time.monotonic()
            async with self._pool().acquire(timeout=deadline.remaining()) as conn:
                POOL_WAIT_SECONDS.labels(self.config.name).observe(time.monotonic() - asked)
                yield conn
        except TimeoutError:
            raise deadline_exceeded() from None

    # -- helpers ---------------------------------------------------------
    def _event_json(self, row: asyncpg.Record) -> dict[str, Any]:
        shard = self.roles.map_shard()
        return {
            "id": row["id"],
            "name": row["name"],
            "venue": row["venue"],
            "startsAt": format_timestamp(row["starts_at"]),
            "currency": row["currency"],
            "homeRegion": shard.primary_region if shard is not None else None,
            "shard": self.config.name,
        }

    async def _wait_for_position(
        self, conn: Connection, request: web.Request, deadline: Deadline
    ) -> None:
        wanted = request.headers.get(MIN_LSN_HEADER)
        if not wanted:
            return
        if not LSN_RE.match(wanted):
            raise Problem(400, "invalid-consistency-token", f"{MIN_LSN_HEADER} is not an LSN.")
        role = self.roles.view.role
        if role not in (Role.PRIMARY, Role.REPLICA):
            # A stale primary would satisfy any position with writes the shard never
            # had; an unknown copy cannot say. Either way: read another copy.
            raise Problem(503, "fenced" if role is Role.FENCED else "role-unknown",
                          "This copy cannot serve a consistent read now; read another copy.",
                          headers={"Retry-After": "1"})
        reached = await conn.fetchval(queries.WAIT_FOR_LSN, wanted, READ_YOUR_WRITES_WAIT_MS,
                                      timeout=deadline.remaining())
        if not reached:
            raise Problem(
                503,
                "replica-behind",
                "This copy has not yet replayed the requested position; read the primary.",
                headers={"Retry-After": "0"},
            )

    async def _write_epoch(self, request: web.Request) -> int:
        """The epoch a write goes to the database with, if this copy may take writes:
        the higher of the gateway's (`X-Boxoffice-Epoch`) and this service's map's.
        Refused: not the primary (503 `not-primary`), a gateway epoch below the map's
        (503 `stale-epoch`: its map is behind), a malformed one (400)."""
        try:
            asked = parse_epoch(request.headers.get(EPOCH_HEADER))
        except ValueError:
            raise Problem(400, "invalid-epoch", f"{EPOCH_HEADER} is not an epoch.") from None
        shard = self.roles.map_shard()
        view = self.roles.view
        if (view.role is not Role.PRIMARY and shard is not None
                and shard.primary_copy == self.config.member):
            # The map names this copy primary but the last check said otherwise: it may
            # have just been promoted and its epoch written. Look again (shared, at
            # most one check per 50 ms) rather than refuse on a stale view.
            view = await self.roles.refresh(max_age=0.05)
            shard = self.roles.map_shard()
        if (view.role is not Role.PRIMARY or shard is None
                or shard.primary_copy != self.config.member):
            raise Problem(503, "not-primary",
                          f"This copy of {self.config.name} is not its primary now.",
                          headers={"Retry-After": "1"}, role=str(view.role))
        if asked is not None and asked < shard.epoch:
            raise Problem(503, "stale-epoch",
                          f"The request was routed by epoch {asked} of {self.config.name}; "
                          f"the map is at epoch {shard.epoch}.",
                          headers={"Retry-After": "1"}, epoch=shard.epoch)
        return max(asked or 0, shard.epoch)

    def _fenced(self, doc: str | None) -> Problem:
        """The database refused the write's epoch; look at the role again soon."""
        self.roles.poke()
        details = json.loads(doc) if doc else {}
        return Problem(503, "fenced",
                       f"This copy's database is not the primary of epoch {details.get('asked')} "
                       f"of {self.config.name}; nothing was written.",
                       headers={"Retry-After": "1"}, epoch=details.get("epoch"))

    @staticmethod
    def _not_confirmed() -> Problem:
        return Problem(
            503, "not-confirmed",
            "The write committed on the primary, but no synchronous standby confirmed it: "
            "it may not survive a failover. Send it again with the same key: the retry "
            "answers it once it is durable.",
            headers={"Retry-After": "1"},
        )

    # -- handlers --------------------------------------------------------
    async def health(self, _: web.Request) -> web.Response:
        return _json(
            {"status": "ok", "region": self.region, "shard": self.config.name,
             "copy": self.config.member, "role": str(self.roles.view.role)}
        )

    async def ready(self, request: web.Request) -> web.Response:
        """Readiness of this copy: its database answers, and the copy is what the map
        says it is (derived role primary or replica; a fenced or unknown copy fails,
        so a stale primary fails its Consul check). Anyone gets the status (Consul's
        check reads the code); the detail needs the operator token."""
        view: RoleView = self.roles.view
        try:
            async with self._pool().acquire(timeout=2) as conn:
                row = await fetch_one(conn, queries.SERVER_STATE, timeout=2)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("readiness check: database unavailable", extra={"error": repr(exc)})
            raise Problem(503, "database-unavailable", "This copy's database is not answering.",
                          headers={"Retry-After": "1"}) from None
        in_recovery = bool(row["in_recovery"])
        role_ok = view.consistent and in_recovery == (view.role is Role.REPLICA)
        status = "ok" if role_ok else "wrong-role" if view.consistent else str(view.role)
        body = {
            "status": status,
            "shard": self.config.name,
            "copy": self.config.member,
            **view.to_json(),
            "database": {
                "inRecovery": in_recovery,
                "lsn": row["lsn"],
                "replayLagSeconds": row["replay_lag_seconds"],
            },
        }
        if not operator_authenticated(request, self.admin_token):
            body = {"status": body["status"]}
        return _json(body, status=200 if role_ok else 503)

    async def list_events(self, request: web.Request) -> web.Response:
        limit = parse_limit(request.query.get("limit"))
        after = decode_cursor(request.query.get("cursor"))
        deadline = _deadline(request)
        async with self._connection(deadline) as conn:
            await self._wait_for_position(conn, request, deadline)
            rows = await conn.fetch(
                queries.LIST_EVENTS,
                after.starts_at if after else None,
                after.event_id if after else None,
                limit,
                timeout=deadline.remaining(),
            )
        events = [self._event_json(r) for r in rows]
        next_cursor = (
            Cursor(rows[-1]["starts_at"], uuid.UUID(rows[-1]["id"])).encode()
            if len(rows) == limit else None
        )
        return _json({"events": events, "nextCursor": next_cursor})

    async def get_event(self, request: web.Request) -> web.Response:
        event_id = require_uuid(request.match_info["event_id"], "event")
        deadline = _deadline(request)
        async with self._connection(deadline) as conn:
            await self._wait_for_position(conn, request, deadline)
            row = await conn.fetchrow(queries.GET_EVENT, event_id, timeout=deadline.remaining())
            if row is None:
                await raise_if_moved(conn, event_id, None, deadline.remaining())
        if row is None:
            raise Problem(404, "event-not-found", f"No event with id {event_id}.")
        return _json(self._event_json(row))

    async def list_tiers(self, request: web.Request) -> web.Response:
        event_id = require_uuid(request.match_info["event_id"], "event")
        deadline = _deadline(request)
        async with self._connection(deadline) as conn:
            await self._wait_for_position(conn, request, deadline)
            rows = await conn.fetch(queries.LIST_TIERS, event_id, timeout=deadline.remaining())
            if not rows and not await conn.fetchval(
                    queries.EVENT_EXISTS, event_id, timeout=deadline.remaining()):
                await raise_if_moved(conn, event_id, None, deadline.remaining())
                raise Problem(404, "event-not-found", f"No event with id {event_id}.")
        tiers = [
            {
                "id": r["id"],
                "eventId": r["event_id"],
                "name": r["name"],
                "priceCents": r["price_cents"],
                "currency": r["currency"],
                "capacity": r["capacity"],
                "remaining": r["remaining"],
            }
            for r in rows
        ]
        return _json({"ticketTiers": tiers})

    async def get_booking(self, request: web.Request) -> web.Response:
        booking_id = require_uuid(request.match_info["booking_id"], "booking")
        deadline = _deadline(request)
        async with self._connection(deadline) as conn:
            await self._wait_for_position(conn, request, deadline)
            body = await conn.fetchval(queries.GET_BOOKING, booking_id, timeout=deadline.remaining())
            if body is None:
                await raise_if_moved(conn, None, booking_id, deadline.remaining())
        if body is None:
            raise Problem(404, "booking-not-found", f"No booking with id {booking_id}.")
        return _raw_json(body)

    async def create_booking(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        booking = parse_booking_request(body, request.headers.get(IDEMPOTENCY_KEY_HEADER))
        epoch = await self._write_epoch(request)
        deadline = _deadline(request)
        if self.combiner is not None:
            result = await self.combiner.book(
                BookingCall(new_booking_id(booking.event_id), booking, epoch, deadline))
            if not result.confirmed:
                raise self._not_confirmed()
            return self._booking_answer(result.outcome, result.body, result.lsn, booking.event_id)
        async with self._connection(deadline) as conn:
            with watch_sync_wait(conn) as sync:
                outcome, doc, lsn = await fetch_one(
                    conn,
                    queries.BOOK,
                    new_booking_id(booking.event_id),
                    booking.event_id,
                    booking.client_reference,
                    [i.ticket_tier_id for i in booking.items],
                    [i.quantity for i in booking.items],
                    epoch,
                    timeout=deadline.remaining(),
                )
        if sync.cancelled:
            raise self._not_confirmed()
        return self._booking_answer(outcome, doc, lsn, booking.event_id)

    async def cancel_booking(self, request: web.Request) -> web.Response:
        booking_id = require_uuid(request.match_info["booking_id"], "booking")
        epoch = await self._write_epoch(request)
        deadline = _deadline(request)
        async with self._connection(deadline) as conn:
            with watch_sync_wait(conn) as sync:
                outcome, doc, lsn = await fetch_one(conn, queries.CANCEL, booking_id, epoch,
                                                    timeout=deadline.remaining())
        if sync.cancelled:
            raise self._not_confirmed()
        if outcome == "fenced":
            raise self._fenced(doc)
        if outcome == "not_found":
            raise Problem(404, "booking-not-found", f"No booking with id {booking_id}.")
        if outcome == "event_moving":
            raise event_moving(json.loads(doc))
        if outcome == "event_moved":
            raise event_moved(json.loads(doc))
        # Cancelling twice is not an error: the booking is cancelled, tickets went back once.
        return _raw_json(doc, 200, {LSN_HEADER: lsn})

    async def audit_event(self, request: web.Request) -> web.Response:
        """Operator: one event's inventory audit on this copy (shard_service/audit.py)."""
        require_operator(request, self.admin_token)
        async with self._connection(_deadline(request)) as conn:
            return await audit.audit_event(conn, request)

    async def create_event(self, request: web.Request) -> web.Response:
        """Operator: create an event with its tiers on this shard."""
        require_operator(request, self.admin_token)
        spec = parse_event_spec(await read_json_object(request))
        epoch = await self._write_epoch(request)
        deadline = _deadline(request)
        async with self._connection(deadline) as conn:
            try:
                with watch_sync_wait(conn) as sync:
                    refused, _ = await fetch_one(
                        conn,
                        queries.CREATE_EVENT,
                        spec.id, spec.name, spec.venue, datetime.fromisoformat(spec.starts_at),
                        spec.currency,
                        [t.id for t in spec.tiers], [t.name for t in spec.tiers],
                        [t.price_cents for t in spec.tiers], [t.capacity for t in spec.tiers],
                        epoch,
                        timeout=deadline.remaining(),
                    )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == queries.EVENTS_PRIMARY_KEY:
                    raise Problem(409, "event-exists", f"Event {spec.id} already exists.",
                                  eventId=str(spec.id)) from None
                raise Problem(  # a tier id some other event already has
                    409, "tier-exists", "A tier id of this event is already another tier's.",
                ) from None
            if sync.cancelled:
                raise self._not_confirmed()
            if refused is not None:
                raise self._fenced(refused)
            lsn = await conn.fetchval(queries.WAL_POSITION, timeout=deadline.remaining())
        return _json(spec.to_json(), 201, {LSN_HEADER: lsn})

    def _booking_answer(
        self, outcome: str, doc: str, lsn: str | None, event_id: uuid.UUID
    ) -> web.Response:
        if outcome == "created":
            booking = json.loads(doc)
            headers = {LSN_HEADER: lsn or "", "Location": f"/api/bookings/{booking['id']}"}
            return _raw_json(doc, 201, headers)
        if outcome == "existing":
            return _raw_json(doc, 200, {LSN_HEADER: lsn or ""})
        if outcome == "fenced":
            raise self._fenced(doc)
        if outcome == "expired":  # reached in its batch after its caller's deadline
            raise deadline_exceeded()
        details = json.loads(doc)
        if outcome == "event_moving":
            raise event_moving(details)
        if outcome == "event_moved":
            raise event_moved(details)
        if outcome == "sold_out":
            raise Problem(
                409,
                "insufficient-inventory",
                f"Not enough tickets left in tier {details['tierName']!r} "
                f"({details['remaining']} left, {details['requested']} requested).",
                ticketTierId=details["ticketTierId"],
                tierName=details["tierName"],
                remaining=details["remaining"],
            )
        if outcome == "event_not_found":
            raise Problem(404, "event-not-found", f"No event with id {event_id}.")
        if outcome == "tier_not_in_event":
            raise Problem(
                422,
                "tier-not-in-event",
                f"Ticket tier {details['ticketTierId']} does not belong to event {event_id}.",
                ticketTierId=details["ticketTierId"],
            )
        if outcome == "reference_conflict":
            raise Problem(
                422,
                "client-reference-reused",
                "This clientReference already names a booking with a different event or items.",
            )  # (never the other booking's id: references are guessable, booking ids are not)
        if outcome == "invalid":
            raise Problem(400, "invalid-request", details["reason"])
        raise RuntimeError(f"unknown booking outcome {outcome!r}")

    def add_routes(self, app: web.Application, prefix: str = "") -> None:
        app.router.add_get(f"{prefix}/api/health", self.health)
        app.router.add_get(f"{prefix}/api/ready", self.ready)
        app.router.add_get(f"{prefix}/api/events", self.list_events)
        app.router.add_get(f"{prefix}/api/events/{{event_id}}", self.get_event)
        app.router.add_get(f"{prefix}/api/events/{{event_id}}/ticket-tiers", self.list_tiers)
        app.router.add_post(f"{prefix}/api/bookings", self.create_booking)
        app.router.add_get(f"{prefix}/api/bookings/{{booking_id}}", self.get_booking)
        app.router.add_post(f"{prefix}/api/bookings/{{booking_id}}/cancel", self.cancel_booking)
        app.router.add_post(f"{prefix}/admin/events", self.create_event)
        app.router.add_get(f"{prefix}/admin/events/{{event_id}}/audit", self.audit_event)
        MoveHandlers(self).add_routes(app, prefix)


@web.middleware
async def database_errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A database that is unreachable, starting, or read-only is a 503 the caller may retry."""
    try:
        return await handler(request)
    except asyncpg.ReadOnlySQLTransactionError:
        raise Problem(503, "read-only", "This shard's database is not accepting writes.",
                      headers={"Retry-After": "1"}) from None
    except asyncpg.QueryCanceledError:  # cancelled by someone else (an operator, a promotion)
        raise Problem(503, "cancelled", "The statement was cancelled; nothing was written.",
                      headers={"Retry-After": "1"}) from None
    except (asyncpg.PostgresConnectionError, asyncpg.OperatorInterventionError,
            asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError,
            asyncpg.InternalClientError, OSError, TimeoutError) as exc:
        # Unreachable, starting, shutting down, or a connection the server dropped under
        # a statement (kill -9 of the postmaster): the copy's health, not the request's.
        log.warning("database unavailable", extra={"error": repr(exc)})
        raise Problem(503, "database-unavailable", "This shard's database is not reachable.",
                      headers={"Retry-After": "1"}) from None


# The app's handlers by shard name, for code that holds the app.
SHARD_HANDLERS = web.AppKey("shard_handlers", dict[str, ShardHandlers])


def create_app(
    shards: list[ShardConfig], region: str, store: MapStore, admin_token: str | None = None,
    protection: ProtectionSettings = SERVICE_DEFAULTS,
    batching: BatchSettings | None = None,
) -> web.Application:
    """The service for `shards` (one copy of each), following the region map in
    `store` (the app starts and stops its watcher and closes the store). Bookings are
    committed in batches per shard when `batching` says so (default: on; off is one
    CALL per booking)."""
    if not shards:
        raise ValueError("a booking service serves at least one shard")
    watcher = MapWatcher(store)
    # Shedding only (its callers are gateways, which rate-limit clients), before any handler.
    shedding = build_protection(replace(protection, booking_rate_per_second=0.0), "shard_service")
    token = admin_token or configured_token()
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[request_id_middleware, metrics_middleware("shard_service"),
                     problem_middleware, admin_auth_middleware(token), *shedding.middlewares,
                     database_errors_middleware],
    )
    app.cleanup_ctx.append(shedding.lifecycle)
    batching = batching if batching is not None else BatchSettings()
    handlers = [ShardHandlers(s, region, token, watcher, batching) for s in shards]
    for h in handlers:
        h.add_routes(app, f"/shards/{h.config.name}")
    if len(handlers) == 1:
        handlers[0].add_routes(app)
    else:

        async def process_health(_: web.Request) -> web.Response:
            return _json({"status": "ok", "region": region,
                          "shards": {h.config.name: str(h.roles.view.role) for h in handlers}})

        app.router.add_get("/api/health", process_health)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        # Bounded wait for the first map: without one every role is `unknown` (reads
        # are served, writes refused) until Consul answers; the watcher keeps the last
        # map it saw while Consul is unreachable.
        await watcher.start()
        for h in handlers:
            await h.open()
        yield
        for h in handlers:
            await h.close()
        await watcher.stop()
        await store.close()

    app.cleanup_ctx.append(lifecycle)
    app[SHARD_HANDLERS] = {h.config.name: h for h in handlers}
    install_telemetry(app, handlers)
    return app
