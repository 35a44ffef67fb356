"""The gateway's operator routes for moving an event to another shard (event_ops/move.py).

    POST /admin/events/{eventId}/move   {"toShard": "shard-2"}  or  {"abort": true}
    GET  /admin/events/{eventId}/move   the placement, the last move's journal, its side

The same `move_event` as `boxoffice event move`: 200 with its report (rows copied, the
event's write pause, duration, `sinceLsn`), 404 for an unknown event or shard, 409 when
it was refused or rolled back (a collision on the target, an unfinished move to another
shard, past its flip when asked to abort), 503 when a dependency failed part-way: the
move is journalled, and sending the request again finishes it (or, before its flip,
`{"abort": true}` rolls it back). Once started, a move is not cancelled by a client
that hangs up: it runs to its end. The operator token is checked by the admin
middleware before routing; the gateway reaches the booking services over HTTP only, as
the CLI does, with the same token.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from common.api import read_json_object, require_uuid
from common.logs import REQUEST_ID_KEY
from common.problems import Problem
from event_ops.move import MoveFailed, MoveRefused, move_event, move_status
from event_ops.shard_admin import ShardAdmin
from region_map import MapError, MapStore

log = logging.getLogger("boxoffice.gateway")

MOVE_FIELDS = frozenset({"toShard", "abort"})
MAX_SHARD_NAME = 100
REFUSAL_STATUS = {"event-not-found": 404, "unknown-shard": 404, "invalid-request": 400}


def add_move_routes(app: web.Application, store: MapStore, admin: ShardAdmin) -> None:
    """Register the routes on `app` (called from gateway.app.create_app); `admin` is the
    gateway's client for booking services' operator calls (its token, its network)."""

    async def start_move(request: web.Request) -> web.Response:
        return await _move(request, store, admin)

    async def show_move(request: web.Request) -> web.Response:
        event_id = _event_id(request)
        try:
            return web.json_response(await move_status(store, event_id))
        except MapError:
            raise Problem(503, "map-unavailable", "Consul did not answer.",
                          headers={"Retry-After": "1"}) from None

    app.router.add_post("/admin/events/{event_id}/move", start_move)
    app.router.add_get("/admin/events/{event_id}/move", show_move)


def _event_id(request: web.Request) -> str:
    return str(require_uuid(request.match_info["event_id"], "event"))


def parse_move_request(body: dict[str, Any]) -> tuple[str | None, bool]:
    """(target shard or None, abort) of a move request, or a 400 problem."""
    unknown = sorted(set(body) - MOVE_FIELDS)
    if unknown:
        raise Problem(400, "invalid-request", f"Unknown field {unknown[0]!r}: send 'toShard' "
                      "(or 'abort': true).", errors=[{"field": unknown[0], "detail": "unknown"}])
    target, abort = body.get("toShard"), body.get("abort", False)
    if not isinstance(abort, bool):
        raise Problem(400, "invalid-request", "'abort' must be true or false.",
                      errors=[{"field": "abort", "detail": "not a boolean"}])
    if target is not None and (not isinstance(target, str) or not 0 < len(target) <= MAX_SHARD_NAME
                               or not target.isprintable()):
        raise Problem(400, "invalid-request", "'toShard' must name a shard.",
                      errors=[{"field": "toShard", "detail": "not a shard name"}])
    if target is None and not abort:
        raise Problem(400, "invalid-request", "Send 'toShard' (or 'abort': true).",
                      errors=[{"field": "toShard", "detail": "required"}])
    return target, abort


async def _move(request: web.Request, store: MapStore, admin: ShardAdmin) -> web.Response:
    event_id = _event_id(request)
    target, abort = parse_move_request(await read_json_object(request))
    task = asyncio.ensure_future(move_event(
        store, admin, event_id, target, abort=abort,
        owner=f"gateway admin API (request {request.get(REQUEST_ID_KEY, '?')})"))
    try:
        report = await asyncio.shield(task)  # a client that hangs up does not stop a move
    except MoveRefused as exc:
        raise Problem(REFUSAL_STATUS.get(exc.kind, 409), exc.kind, exc.detail,
                      **{k: v for k, v in exc.extra.items()
                         if k in ("tierIds", "clientReferences", "target")}) from None
    except MoveFailed as exc:
        log.warning("event move failed", extra={"event_id": event_id, "kind": exc.kind,
                                                "error": exc.detail})
        raise Problem(503, exc.kind, f"{exc.detail} Send the request again to finish the move.",
                      headers={"Retry-After": "1"}) from None
    log.warning("event move done", extra={"event_id": event_id, "outcome": report.outcome,
                                          "target": report.target,
                                          "pause_seconds": report.pause_seconds})
    return web.json_response(report.to_json())
