"""The booking service's reads: events, tiers, bookings, from this copy.

Any copy on the map's primary's history serves them: derived role primary or
replica (shard_service/roles.py). A fenced copy answers every read 503 at once, with
or without a token: an old primary restarted before its rewind (its unconfirmed
commits visible), or a standby of one, serves nothing (`wait_for_position`); an
unknown one (its role check failed) answers a read for a token 503. A read that
carries a consistency token (`X-Boxoffice-Min-Lsn`, and `X-Boxoffice-Min-Epoch`, the
epoch of the token's entry) is refused 503 `epoch-behind` by a copy whose epoch row
is older than that epoch, whatever its LSN; otherwise it first waits briefly until
this copy has replayed that position; if it cannot, it is 503 `replica-behind` and
the gateway reads the primary instead.

A booking's full view is its buyer's (MISSION.md §6): the caller sends the booking's
`Booking-Secret` (its SHA-256 is compared in SQL, queries.GET_BOOKING); without it, or
with another, the answer is the 404 of an id that is not here. Operators (the operator
token) see every booking.

Unlisted events (drills, tests: `events.unlisted`) are readable by id like any other,
but never in the listing, unless an operator asks for them (`?include=unlisted`, the
operator's token): then every event carries `unlisted`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
from aiohttp import web
from asyncpg.pool import PoolConnectionProxy

from common.api import (
    BOOKING_SECRET_HEADER,
    parse_booking_secret,
    parse_limit,
    require_uuid,
    secret_hash,
)
from common.auth import operator_authenticated, require_operator
from common.cursor import Cursor, decode_cursor, format_timestamp
from common.deadlines import Deadline
from common.problems import Problem
from shard_service import queries
from shard_service.connections import Connection
from shard_service.http import json_response as _json
from shard_service.http import raw_json as _raw_json
from shard_service.http import request_deadline as _deadline
from shard_service.moves import raise_if_moved
from shard_service.roles import RoleTracker, read_refusal

MIN_LSN_HEADER = "X-Boxoffice-Min-Lsn"
MIN_EPOCH_HEADER = "X-Boxoffice-Min-Epoch"
EPOCH_RE = re.compile(r"^(0|[1-9][0-9]{0,17})$")
LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
READ_YOUR_WRITES_WAIT_MS = 250
INCLUDE_UNLISTED = "unlisted"  # ?include=unlisted (operators)

ConnectionSource = Callable[[Deadline], AbstractAsyncContextManager[PoolConnectionProxy]]


class ReadHandlers:
    """The read handlers of one shard copy."""

    def __init__(self, shard: str, roles: RoleTracker, connection: ConnectionSource,
                 admin_token: str | None) -> None:
        self.shard = shard
        self.roles = roles
        self._connection = connection
        self.admin_token = admin_token

    def add_routes(self, app: web.Application, prefix: str) -> None:
        app.router.add_get(f"{prefix}/api/events", self.list_events)
        app.router.add_get(f"{prefix}/api/events/{{event_id}}", self.get_event)
        app.router.add_get(f"{prefix}/api/events/{{event_id}}/ticket-tiers", self.list_tiers)
        app.router.add_get(f"{prefix}/api/bookings/{{booking_id}}", self.get_booking)

    def event_json(self, row: asyncpg.Record, with_unlisted: bool = False) -> dict[str, Any]:
        shard = self.roles.map_shard()
        doc = {
            "id": row["id"],
            "name": row["name"],
            "venue": row["venue"],
            "startsAt": format_timestamp(row["starts_at"]),
            "currency": row["currency"],
            "homeRegion": shard.primary_region if shard is not None else None,
            "shard": self.shard,
        }
        if with_unlisted:
            doc["unlisted"] = bool(row["unlisted"])
        return doc

    async def wait_for_position(
        self, conn: Connection, request: web.Request, deadline: Deadline
    ) -> None:
        """Every read starts here: refused by a fenced copy (not on the map's primary's
        history); for a token, refused unless the role is primary or replica and on the
        token entry's epoch or a later one, then a bounded wait for its position."""
        wanted = request.headers.get(MIN_LSN_HEADER)
        if wanted and not LSN_RE.match(wanted):
            raise Problem(400, "invalid-consistency-token", f"{MIN_LSN_HEADER} is not an LSN.")
        raw_epoch = request.headers.get(MIN_EPOCH_HEADER)
        if raw_epoch is not None and not EPOCH_RE.match(raw_epoch):
            raise Problem(400, "invalid-consistency-token", f"{MIN_EPOCH_HEADER} is not an epoch.")
        wanted_epoch = int(raw_epoch) if raw_epoch else 0
        token = bool(wanted)
        refusal = read_refusal(self.roles.view, wanted_epoch, token)
        if refusal is not None and refusal[0] == "epoch-behind":
            # The epoch row may have arrived since the last check: look again (shared,
            # at most one check per 50 ms) rather than refuse on a stale view.
            refusal = read_refusal(await self.roles.refresh(max_age=0.05), wanted_epoch, token)
        if refusal is not None:
            kind, detail = refusal
            raise Problem(503, kind, detail, headers={"Retry-After": "1"})
        if not wanted:
            return
        reached = await conn.fetchval(queries.WAIT_FOR_LSN, wanted, READ_YOUR_WRITES_WAIT_MS,
                                      timeout=deadline.remaining())
        if not reached:
            raise Problem(
                503,
                "replica-behind",
                "This copy has not yet replayed the requested position; read the primary.",
                headers={"Retry-After": "0"},
            )

    async def list_events(self, request: web.Request) -> web.Response:
        limit = parse_limit(request.query.get("limit"))
        after = decode_cursor(request.query.get("cursor"))
        include = request.query.get("include")
        if include not in (None, INCLUDE_UNLISTED):
            raise Problem(400, "invalid-request", "include is 'unlisted' or absent.",
                          errors=[{"field": "include", "detail": "unknown value"}])
        with_unlisted = include == INCLUDE_UNLISTED
        if with_unlisted:
            require_operator(request, self.admin_token)
        deadline = _deadline(request)
        async with self._connection(deadline) as conn:
            await self.wait_for_position(conn, request, deadline)
            rows = await conn.fetch(
                queries.LIST_EVENTS,
                after.starts_at if after else None,
                after.event_id if after else None,
                limit,
                with_unlisted,
                timeout=deadline.remaining(),
            )
        events = [self.event_json(r, with_unlisted) for r in rows]
        next_cursor = (
            Cursor(rows[-1]["starts_at"], uuid.UUID(rows[-1]["id"])).encode()
            if len(rows) == limit else None
        )
        return _json({"events": events, "nextCursor": next_cursor})

    async def get_event(self, request: web.Request) -> web.Response:
        event_id = require_uuid(request.match_info["event_id"], "event")
        deadline = _deadline(request)
        async with self._connection(deadline) as conn:
            await self.wait_for_position(conn, request, deadline)
            row = await conn.fetchrow(queries.GET_EVENT, event_id, timeout=deadline.remaining())
            if row is None:
                await raise_if_moved(conn, event_id, None, deadline.remaining())
        if row is None:
            raise Problem(404, "event-not-found", f"No event with id {event_id}.")
        return _json(self.event_json(row))

    async def list_tiers(self, request: web.Request) -> web.Response:
        event_id = require_uuid(request.match_info["event_id"], "event")
        deadline = _deadline(request)
        async with self._connection(deadline) as conn:
            await self.wait_for_position(conn, request, deadline)
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
        secret = parse_booking_secret(request.headers.get(BOOKING_SECRET_HEADER))
        hashed = secret_hash(secret) if secret is not None else None
        operator = operator_authenticated(request, self.admin_token)
        deadline = _deadline(request)
        async with self._connection(deadline) as conn:
            await self.wait_for_position(conn, request, deadline)
            body = await conn.fetchval(queries.GET_BOOKING, booking_id, hashed, operator,
                                       timeout=deadline.remaining())
            if body is None:
                await raise_if_moved(conn, None, booking_id, deadline.remaining())
        if body is None:
            raise Problem(404, "booking-not-found", f"No booking with id {booking_id}.")
        return _raw_json(body)

