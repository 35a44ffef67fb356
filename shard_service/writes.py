"""The booking service's writes: book, cancel, create an event (operators).

Each goes through the one write path (shard_service/write_path.py: epoch, deadline,
connection, synchronous wait, the CALL, the fenced and not-confirmed checks, in that
order); this module turns each procedure's outcome into its answer.

- A booking goes to the database one CALL each, or, with batching on, through the
  shard's combiner (shard_service/combiner.py): the requests that arrive while a batch
  is in flight go together as the next batch, one CALL, one commit, one synchronous
  wait, each request with its own answer.
- A booking belongs to its buyer (MISSION.md §6): the caller's `Booking-Secret` (the
  gateway always sends one: the client's, or one it made) is stored as its SHA-256
  with the booking, and the 201 body carries it back as `bookingSecret`. A client
  reference already used is answered only to that secret: without it (or with another)
  it is one uniform 409 `client-reference-in-use`, with no booking id and the same
  whatever the event and items. A cancel without the secret is the 404 of an unknown
  id (reads.py does the same for the full view). A caller that sends no secret (an
  internal caller, not through a gateway) owns only the bookings made without one.
- A replayed booking (same client reference and items) is 200 with the booking, a
  cancel of a cancelled booking 200, an event created again with the same spec 200
  with the event: each only once the synchronous standbys hold it (the procedures take
  boxoffice_sync_mark for that, write_path.py). 201 for a new booking or event.
- Creating an event under an id another event has here is 409 `event-exists`; a tier
  id another event has, 409 `tier-exists`.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime

import asyncpg
from aiohttp import web

from common.api import (
    BOOKING_SECRET_HEADER,
    IDEMPOTENCY_KEY_HEADER,
    parse_booking_request,
    parse_booking_secret,
    parse_event_spec,
    read_json_object,
    require_uuid,
    secret_hash,
)
from common.auth import require_operator
from common.ids import new_booking_id
from common.problems import Problem
from shard_service import queries
from shard_service.combiner import BookingCall, BookingCombiner
from shard_service.http import json_response as _json
from shard_service.http import raw_json as _raw_json
from shard_service.moves import event_moved, event_moving
from shard_service.write_path import Committed, WriteCall, WritePath, commit, deadline_exceeded

LSN_HEADER = "X-Boxoffice-Lsn"


class WriteHandlers:
    """The write handlers of one shard copy."""

    def __init__(self, path: WritePath, combiner: BookingCombiner | None,
                 admin_token: str | None) -> None:
        self.path = path
        self.combiner = combiner
        self.admin_token = admin_token

    def add_routes(self, app: web.Application, prefix: str) -> None:
        app.router.add_post(f"{prefix}/api/bookings", self.create_booking)
        app.router.add_post(f"{prefix}/api/bookings/{{booking_id}}/cancel", self.cancel_booking)
        app.router.add_post(f"{prefix}/admin/events", self.create_event)

    async def create_booking(self, request: web.Request) -> web.Response:
        secret = parse_booking_secret(request.headers.get(BOOKING_SECRET_HEADER))
        hashed = secret_hash(secret) if secret is not None else None
        body = await read_json_object(request)
        booking = parse_booking_request(body, request.headers.get(IDEMPOTENCY_KEY_HEADER))
        combiner = self.combiner

        async def send(call: WriteCall) -> Committed:
            booking_id = new_booking_id(booking.event_id)
            if combiner is not None:
                return await combiner.book(BookingCall(booking_id, booking, call.epoch,
                                                       call.deadline, hashed))
            row, confirmed = await commit(
                self.path.connection, call.deadline, queries.BOOK, booking_id, booking.event_id,
                booking.client_reference, [i.ticket_tier_id for i in booking.items],
                [i.quantity for i in booking.items], hashed, call.epoch)
            return Committed(row[0], row[1], row[2], confirmed)

        done = await self.path.run(request, send)
        return self._booking_answer(done, booking.event_id, secret)

    async def cancel_booking(self, request: web.Request) -> web.Response:
        booking_id = require_uuid(request.match_info["booking_id"], "booking")
        secret = parse_booking_secret(request.headers.get(BOOKING_SECRET_HEADER))
        done = await self.path.call(request, queries.CANCEL, booking_id,
                                    secret_hash(secret) if secret is not None else None)
        if done.outcome == "not_found":
            raise Problem(404, "booking-not-found", f"No booking with id {booking_id}.")
        if done.outcome == "event_moving":
            raise event_moving(done.doc())
        if done.outcome == "event_moved":
            raise event_moved(done.doc())
        # Cancelling twice is not an error: the booking is cancelled, tickets went back once.
        return _raw_json(done.body or "{}", 200, {LSN_HEADER: done.lsn or ""})

    async def create_event(self, request: web.Request) -> web.Response:
        """Operator: create an event with its tiers on this shard (sql/events.sql)."""
        require_operator(request, self.admin_token)
        spec = parse_event_spec(await read_json_object(request))
        try:
            done = await self.path.call(
                request, queries.CREATE_EVENT,
                spec.id, spec.name, spec.venue, datetime.fromisoformat(spec.starts_at),
                spec.currency, spec.unlisted,
                [t.id for t in spec.tiers], [t.name for t in spec.tiers],
                [t.price_cents for t in spec.tiers], [t.capacity for t in spec.tiers])
        except asyncpg.UniqueViolationError:  # a concurrent creation took a tier id first
            raise self._tier_exists() from None
        if done.outcome == "different":
            raise Problem(409, "event-exists",
                          f"Event {spec.id} already exists here, with another name, venue, "
                          "start, currency, listing or tiers.", eventId=str(spec.id))
        if done.outcome == "tier_taken":
            raise self._tier_exists()
        if done.outcome == "event_moving":
            raise event_moving(done.doc())
        if done.outcome == "event_moved":
            raise event_moved(done.doc())
        status = 201 if done.outcome == "created" else 200  # 200: `existing`, a retry
        return _json(spec.to_json(), status, {LSN_HEADER: done.lsn or ""})

    @staticmethod
    def _tier_exists() -> Problem:
        return Problem(409, "tier-exists", "A tier id of this event is already another tier's.")

    @staticmethod
    def _booking_answer(done: Committed, event_id: uuid.UUID, secret: str | None) -> web.Response:
        outcome, doc, lsn = done.outcome, done.body or "{}", done.lsn
        if outcome in ("created", "existing"):
            booking = json.loads(doc)
            if secret is not None:  # the buyer's own, handed back with its booking
                booking["bookingSecret"] = secret
            headers = {LSN_HEADER: lsn or ""}
            if outcome == "created":
                headers["Location"] = f"/api/bookings/{booking['id']}"
            return _json(booking, 201 if outcome == "created" else 200, headers)
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
        if outcome == "reference_in_use":  # not the buyer: nothing about the booking
            raise reference_in_use()
        if outcome == "reference_conflict":
            raise Problem(
                422,
                "client-reference-reused",
                "This clientReference already names a booking with a different event or items.",
            )  # (answered to the booking's own buyer only: it sent the secret)
        if outcome == "invalid":
            raise Problem(400, "invalid-request", details["reason"])
        raise RuntimeError(f"unknown booking outcome {outcome!r}")


def reference_in_use() -> Problem:
    """The one answer to a client reference another buyer's booking has (or one made
    without the caller's secret): the same whatever the request's event and items, with
    no booking id, so a guessed reference learns nothing but that it is taken."""
    return Problem(409, "client-reference-in-use",
                   "This clientReference already names a booking. Only its buyer can replay it: "
                   f"send the {BOOKING_SECRET_HEADER} the booking was made with, or use "
                   "another reference.")
