"""A booking service's part in moving an event between shards (sql/moves.sql).

The move itself runs elsewhere (event_ops/move.py, from the CLI or a gateway's admin
API); it calls these operator endpoints on the source's and the target's primaries,
under `.../admin/moves/{event_id}/`:

    GET  state       the event's write state here (open, importing, frozen, moved)
    GET  keys        source: its tier ids and client references (preflight)
    POST collisions  target: which of those collide with another event's here
    GET  export      source: one page of the event's rows, since a watermark
    POST import      target: upsert a page, verbatim, holding the event `importing`
                     (and, asked, answer the digest after it)
    GET  digest      either: per-tier counts and a checksum of the bookings
    POST freeze      source: stop the event's writes (takes its tier locks); its digest
    POST unfreeze    source: roll back a freeze (before the flip only)
    POST activate    target: open the event (after the flip)
    POST retire      source: delete the event's rows, leave the tombstone
    POST abandon     target: roll back an import (before the flip only)

Every write step goes through the booking service's one write path
(shard_service/write_path.py): fenced by the epoch like a booking (`X-Boxoffice-Epoch`,
and the database's epoch row) and by the move's lease (`X-Boxoffice-Sequencer`: a step
whose sequencer is older than the newest the shard's database has seen for that lease
is 409 `stale-sequencer`, nothing written: its runner lost the lease), commits, waits
for the synchronous standbys like any commit (a retried step that finds its work done
too), and answers the WAL position it reached (`lsn`). Each is idempotent.

This module also holds the answers a write or a read gets for an event that is moving
(`event-moving`, 503, retryable: the pause of a move) or has moved (`event-moved`, 421
Misdirected Request naming the shard that has it: the caller's map is stale).
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
from aiohttp import web

from common.api import read_json_object, require_uuid
from common.auth import require_operator
from common.problems import Problem
from shard_service import queries
from shard_service.connections import Connection, fetch_one
from shard_service.http import json_response as _json
from shard_service.http import raw_json as _raw_json
from shard_service.http import request_deadline as _deadline

if TYPE_CHECKING:
    from shard_service.app import ShardHandlers

MOVE_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
MAX_MOVE_ID = 100
MAX_SHARD_NAME = 100
IMPORT_MAX_BYTES = 8 * 1024 * 1024  # one export page (event_ops asks for at most ~1,000 bookings)
MAX_EXPORT_PAGE = 5000
MAX_KEYS = 200_000  # client references sent back for the collision check


def event_moving(details: dict[str, Any]) -> Problem:
    """A write to an event that is moving: retry shortly (the move's pause)."""
    return Problem(503, "event-moving",
                   "This event is moving to another shard; nothing was written. Send the "
                   "request again with the same key: it goes through once the move is done.",
                   headers={"Retry-After": "1"}, state=details.get("state"),
                   shard=details.get("shard"))


def event_moved(details: dict[str, Any]) -> Problem:
    """A request for an event that left this shard (the tombstone names where to)."""
    return Problem(421, "event-moved",
                   f"This event moved to shard {details.get('shard')}; nothing was written. "
                   "Send the request again through a gateway that knows the new placement.",
                   title="Misdirected Request", headers={"Retry-After": "0"},
                   shard=details.get("shard"), eventId=details.get("eventId"))


async def raise_if_moved(conn: Connection, event_id: uuid.UUID | None, booking_id: uuid.UUID | None,
                         timeout: float) -> None:
    """For a read that found nothing: `event-moved` when a tombstone covers it."""
    tomb = await conn.fetchval(queries.TOMBSTONE, event_id, booking_id, timeout=timeout)
    if tomb is not None:
        raise event_moved(json.loads(tomb))


def _text(body: dict[str, Any], name: str, limit: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise Problem(400, "invalid-request", f"{name} must be a string of 1 to {limit} characters.",
                      errors=[{"field": name, "detail": "missing or not a short string"}])
    return value


def _move_id(body: dict[str, Any]) -> str:
    value = _text(body, "moveId", MAX_MOVE_ID)
    if not set(value) <= MOVE_ID_CHARS:
        raise Problem(400, "invalid-request", "moveId is lower-case letters, digits and '-'.",
                      errors=[{"field": "moveId", "detail": "not a move id"}])
    return value


class MoveHandlers:
    """The move endpoints of one shard copy (bound to its `ShardHandlers`)."""

    def __init__(self, shard: ShardHandlers) -> None:
        self.shard = shard

    def add_routes(self, app: web.Application, prefix: str) -> None:
        base = f"{prefix}/admin/moves/{{event_id}}"
        app.router.add_get(f"{base}/state", self.state)
        app.router.add_get(f"{base}/keys", self.keys)
        app.router.add_post(f"{base}/collisions", self.collisions)
        app.router.add_get(f"{base}/export", self.export)
        app.router.add_get(f"{base}/digest", self.digest)
        app.router.add_post(f"{base}/import", self.import_page)
        app.router.add_post(f"{base}/freeze", self.freeze)
        app.router.add_post(f"{base}/unfreeze", self.unfreeze)
        app.router.add_post(f"{base}/activate", self.activate)
        app.router.add_post(f"{base}/retire", self.retire)
        app.router.add_post(f"{base}/abandon", self.abandon)

    def _event(self, request: web.Request) -> uuid.UUID:
        require_operator(request, self.shard.admin_token)
        return require_uuid(request.match_info["event_id"], "event")

    async def _read(self, request: web.Request, sql: str, *args: object) -> web.Response:
        """A read-only function's JSON document, from this copy (the mover asks primaries)."""
        deadline = _deadline(request)
        async with self.shard.path.connection(deadline) as conn:
            doc = await conn.fetchval(sql, *args, timeout=deadline.remaining())
        return _raw_json(doc)

    # -- reads -------------------------------------------------------------------
    async def state(self, request: web.Request) -> web.Response:
        event_id = self._event(request)
        deadline = _deadline(request)
        async with self.shard.path.connection(deadline) as conn:
            row = await fetch_one(conn, queries.MOVE_STATE, event_id, timeout=deadline.remaining())
        return _json({"eventId": str(event_id), "state": row["state"] or "open",
                      "peerShard": row["peer_shard"], "moveId": row["move_id"],
                      "since": row["updated_at"], "present": row["present"]})

    async def keys(self, request: web.Request) -> web.Response:
        return await self._read(request, queries.MOVE_KEYS, self._event(request))

    async def digest(self, request: web.Request) -> web.Response:
        return await self._read(request, queries.MOVE_DIGEST, self._event(request))

    async def export(self, request: web.Request) -> web.Response:
        event_id = self._event(request)
        since = request.query.get("since") or None
        after_raw = request.query.get("after")
        after = require_uuid(after_raw, "booking") if after_raw else None
        try:
            limit = int(request.query.get("limit", "1000"))
        except ValueError:
            limit = 0
        if not 0 < limit <= MAX_EXPORT_PAGE:
            raise Problem(400, "invalid-request", f"limit must be 1 to {MAX_EXPORT_PAGE}.",
                          errors=[{"field": "limit", "detail": "out of range"}])
        if since is not None and (len(since) > 64 or not since[:4].isdigit()):
            raise Problem(400, "invalid-request", "since is a watermark an export gave.",
                          errors=[{"field": "since", "detail": "not a watermark"}])
        deadline = _deadline(request)
        async with self.shard.path.connection(deadline) as conn:
            # Two statements, so two snapshots: the watermark's is taken first (sql/moves.sql).
            watermark = await conn.fetchval(queries.MOVE_WATERMARK, timeout=deadline.remaining())
            try:
                doc = await conn.fetchval(queries.MOVE_EXPORT, event_id, since, after, limit,
                                          timeout=deadline.remaining())
            except asyncpg.DataError:  # a malformed timestamp: the database's cast says so
                raise Problem(400, "invalid-request", "since is a watermark an export gave.",
                              errors=[{"field": "since", "detail": "not a timestamp"}]) from None
        page = json.loads(doc)
        page["watermark"] = watermark
        return _json(page)

    async def collisions(self, request: web.Request) -> web.Response:
        event_id = self._event(request)
        body = await read_json_object(request, max_bytes=IMPORT_MAX_BYTES)
        tier_ids = body.get("tierIds")
        refs = body.get("clientReferences")
        if (not isinstance(tier_ids, list) or not isinstance(refs, list) or len(refs) > MAX_KEYS
                or not all(isinstance(r, str) for r in refs)):
            raise Problem(400, "invalid-request", "tierIds and clientReferences are lists.",
                          errors=[{"field": "tierIds", "detail": "a list of tier ids"}])
        tiers = [require_uuid(str(t), "tier") for t in tier_ids]
        return await self._read(request, queries.MOVE_COLLISIONS, event_id, tiers, refs)

    async def _digest(self, request: web.Request, event_id: uuid.UUID) -> Any:
        deadline = _deadline(request)
        async with self.shard.path.connection(deadline) as conn:
            return json.loads(await conn.fetchval(queries.MOVE_DIGEST, event_id,
                                                  timeout=deadline.remaining()))

    # -- writes ------------------------------------------------------------------
    async def _call(self, request: web.Request, sql: str,
                    *args: object) -> tuple[str, dict[str, Any], str | None]:
        """One write step through the write path (shard_service/write_path.py), fenced by
        the epoch and by the lease's sequencer: (outcome, body, lsn)."""
        done = await self.shard.path.call(request, sql, *args, fenced_by_lease=True)
        return done.outcome, done.doc(), done.lsn

    @staticmethod
    def _answer(outcome: str, doc: dict[str, Any], lsn: str | None) -> web.Response:
        return _json({"outcome": outcome, **doc, "lsn": lsn})

    async def import_page(self, request: web.Request) -> web.Response:
        event_id = self._event(request)
        body = await read_json_object(request, max_bytes=IMPORT_MAX_BYTES)
        move_id = _move_id(body)
        source = _text(body, "sourceShard", MAX_SHARD_NAME)
        page = body.get("page")
        if (not isinstance(page, dict) or not isinstance(page.get("event"), dict)
                or str(page["event"].get("id")) != str(event_id)
                or not isinstance(page.get("tiers"), list)
                or not isinstance(page.get("bookings"), list)):
            raise Problem(400, "invalid-request", "page is an export of this event.",
                          errors=[{"field": "page", "detail": "not an export of this event"}])
        digest = body.get("digest", False)
        if not isinstance(digest, bool):
            raise Problem(400, "invalid-request", "digest is true or false.",
                          errors=[{"field": "digest", "detail": "not a boolean"}])
        try:
            outcome, doc, lsn = await self._call(request, queries.MOVE_IMPORT, move_id, source,
                                                 json.dumps(page))
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError):
            # A page that is not an export (a cast or a constraint fails): nothing written.
            raise Problem(400, "invalid-request", "page is not a well-formed export.",
                          errors=[{"field": "page", "detail": "malformed rows"}]) from None
        if outcome == "collision":
            raise Problem(409, "move-collision",
                          "A tier id or client reference of the event is another event's on "
                          "this shard; nothing was imported.", **doc)
        if outcome == "not_importing":
            raise Problem(409, "move-conflict", "Another move holds this event here.", **doc)
        if digest:  # the final copy's check, without another round trip
            doc["digest"] = await self._digest(request, event_id)
        return self._answer(outcome, doc, lsn)

    async def freeze(self, request: web.Request) -> web.Response:
        event_id = self._event(request)
        body = await read_json_object(request)
        outcome, doc, lsn = await self._call(request, queries.MOVE_FREEZE, event_id, _move_id(body),
                                             _text(body, "targetShard", MAX_SHARD_NAME))
        if outcome == "not_here":
            raise Problem(404, "event-not-found", f"Event {event_id} is not on this shard.")
        if outcome == "not_open":
            raise Problem(409, "move-conflict", "The event is not open here.", **doc)
        # Frozen, the event's rows change no more: this digest is the one the copy must match.
        doc["digest"] = await self._digest(request, event_id)
        return self._answer(outcome, doc, lsn)

    async def unfreeze(self, request: web.Request) -> web.Response:
        event_id = self._event(request)
        body = await read_json_object(request)
        outcome, doc, lsn = await self._call(request, queries.MOVE_UNFREEZE, event_id, _move_id(body))
        if outcome == "not_ours":
            raise Problem(409, "move-conflict", "Another move has frozen the event here.", **doc)
        return self._answer(outcome, doc, lsn)

    async def activate(self, request: web.Request) -> web.Response:
        event_id = self._event(request)
        body = await read_json_object(request)
        outcome, doc, lsn = await self._call(request, queries.MOVE_ACTIVATE, event_id, _move_id(body))
        if outcome == "not_importing":
            raise Problem(409, "move-conflict", "This move holds no import of the event here.")
        return self._answer(outcome, doc, lsn)

    async def retire(self, request: web.Request) -> web.Response:
        event_id = self._event(request)
        body = await read_json_object(request)
        outcome, doc, lsn = await self._call(request, queries.MOVE_RETIRE, event_id, _move_id(body),
                                             _text(body, "targetShard", MAX_SHARD_NAME))
        if outcome == "not_frozen":
            raise Problem(409, "move-conflict", "This move has not frozen the event here.", **doc)
        return self._answer(outcome, doc, lsn)

    async def abandon(self, request: web.Request) -> web.Response:
        event_id = self._event(request)
        body = await read_json_object(request)
        return self._answer(*await self._call(request, queries.MOVE_ABANDON, event_id, _move_id(body)))
