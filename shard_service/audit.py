"""Operator audit of one event's inventory on this copy, over HTTP.

`GET .../admin/events/{event_id}/audit?referencePrefix=P` (operator token): the same
one-snapshot audit the load test and the drills run on a database directly
(`shard_service.inventory.audit_inventory`: sold + remaining = capacity per tier, no
reference on two bookings, and the bookings whose reference starts with P), for a
caller that has no database access: a gateway running a drill. Read-only.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from common.api import require_uuid
from common.problems import Problem
from shard_service.connections import Connection
from shard_service.inventory import InventoryAudit, audit_inventory

_PREFIX = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


def audit_document(audit: InventoryAudit) -> dict[str, Any]:
    return {
        "tiers": [{"tier": t.tier_id, "capacity": t.capacity, "sold": t.sold,
                   "remaining": t.remaining} for t in audit.tiers],
        "oversold": [{"tier": t.tier_id, "capacity": t.capacity, "sold": t.sold,
                      "remaining": t.remaining} for t in audit.violations],
        "duplicated": [{k: (str(v) if not isinstance(v, int) else v) for k, v in d.items()}
                       for d in audit.duplicate_references],
        "bookings": dict(audit.bookings),
    }


async def audit_event(conn: Connection, request: web.Request) -> web.Response:
    event_id = require_uuid(request.match_info["event_id"], "event")
    prefix = request.query.get("referencePrefix")
    if prefix is not None and not _PREFIX.match(prefix):
        raise Problem(400, "invalid-request", "referencePrefix must be 1 to 100 of A-Z a-z 0-9 . _ : -",
                      errors=[{"field": "referencePrefix", "detail": "not a reference prefix"}])
    audit = await audit_inventory(conn, event_id=str(event_id), reference_prefix=prefix)
    return web.json_response(audit_document(audit))
