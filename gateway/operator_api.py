"""The gateway's operator routes that change the cluster rather than serve bookings.

    POST /admin/shards/{shard}/promote      {"to": "region[/zone]", "force": false}
    POST /admin/shards/{shard}/switchover   {"to": "region[/zone]"}

Emergency promotion of a shard copy (failover/promote.py), the same primitive as
`boxoffice shard promote`: 200 with the report, 404 `unknown-shard`, 400 for a bad body
or an unknown copy, 409 for a refusal (nothing changed: the candidate is not in the
synchronous set, is not the most recent of a quorum, another operation holds the shard,
...), 503 when a dependency (Consul, a node agent) failed; its `committed` says whether
the map already names the new primary, and running the request again finishes or rolls
back. Every gateway serves it. The operator token is checked by the admin middleware
(everything under /admin); the same token authenticates the gateway to the node agents,
which it reaches over HTTP only (found through the service registry): the gateway has no
database connection. A promotion, once started, is not cancelled by a client that hangs
up: it runs to its end (or to a resumable journal).

A planned switchover (failover/switchover.py) answers the same way: 200 with its report
(`writesHeldSeconds`: how long the gateways held the shard's writes), 409 refused (the
target is not a streaming standby in the synchronous set, the primary is not running,
another operation holds the shard, ...; a failure before the commit point is rolled
back), 503 when a dependency failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from aiohttp import web

from common.api import read_json_object
from common.logs import REQUEST_ID_KEY
from common.problems import Problem
from failover import NodeAgents, PromoteFailed, PromoteRefused, PromoteReport, promote
from failover.switchover import switchover
from region_map import MapStore

log = logging.getLogger("boxoffice.gateway")

AGENTS = web.AppKey("node_agents", NodeAgents)
PROMOTE_FIELDS = frozenset({"to", "force"})
SWITCHOVER_FIELDS = frozenset({"to"})
MAX_TARGET_LENGTH = 200


def add_operator_routes(app: web.Application, store: MapStore, token: str | None) -> None:
    """Register the routes on `app` (called from gateway.app.create_app)."""
    app[AGENTS] = NodeAgents(store, token or "")

    async def close_agents(app: web.Application) -> None:
        await app[AGENTS].close()

    app.on_cleanup.append(close_agents)

    async def promote_shard(request: web.Request) -> web.Response:
        return await _promote(request, store)

    async def switchover_shard(request: web.Request) -> web.Response:
        return await _switchover(request, store)

    app.router.add_post("/admin/shards/{shard}/promote", promote_shard)
    app.router.add_post("/admin/shards/{shard}/switchover", switchover_shard)


def _parse_promote(body: dict[str, Any], fields: frozenset[str] = PROMOTE_FIELDS) -> tuple[str, bool]:
    unknown = sorted(set(body) - fields)
    if unknown:
        allowed = " and ".join(repr(f) for f in sorted(fields, reverse=True))
        raise Problem(400, "invalid-request", f"Unknown field {unknown[0]!r}: send {allowed}.")
    target, force = body.get("to"), body.get("force", False)
    if not isinstance(target, str) or not target.strip() or len(target) > MAX_TARGET_LENGTH \
            or not target.isprintable():
        raise Problem(400, "invalid-request", "'to' must name a copy: \"region\" or \"region/zone\".")
    if not isinstance(force, bool):
        raise Problem(400, "invalid-request", "'force' must be true or false.")
    return target, force


async def _promote(request: web.Request, store: MapStore) -> web.Response:
    target, force = _parse_promote(await read_json_object(request))
    return await _change_primary(request, "promotion", partial(
        promote, store, request.app[AGENTS], request.match_info["shard"], target, force=force))


async def _switchover(request: web.Request, store: MapStore) -> web.Response:
    target, _ = _parse_promote(await read_json_object(request), SWITCHOVER_FIELDS)
    return await _change_primary(request, "switchover", partial(
        switchover, store, request.app[AGENTS], request.match_info["shard"], target))


async def _change_primary(request: web.Request, what: str,
                          operation: Callable[..., Awaitable[PromoteReport]]) -> web.Response:
    """Run a promotion or switchover to its end (a client that hangs up does not stop it)
    and answer its report; a refusal is 409 (404 unknown shard, 400 unknown copy), a
    dependency that failed 503 saying whether the map already names the new primary."""
    shard = request.match_info["shard"]
    task = asyncio.ensure_future(operation(
        owner=f"gateway admin API (request {request.get(REQUEST_ID_KEY, '?')})"))
    try:
        report = await asyncio.shield(task)
    except PromoteRefused as exc:
        status = {"unknown-shard": 404, "unknown-copy": 400}.get(exc.kind, 409)
        raise Problem(status, exc.kind, exc.detail,
                      **{k: v for k, v in exc.extra.items() if k in ("problems",)}) from None
    except PromoteFailed as exc:
        log.warning(f"{what} failed", extra={"shard": shard, "kind": exc.kind, "error": exc.detail})
        then = (f"The map already names the new primary; send the request again to finish the "
                f"{what}." if exc.committed else
                "Nothing was committed; send the request again to retry (an unfinished attempt "
                "is rolled back first).")
        raise Problem(503, exc.kind, f"A dependency of the {what} did not answer. {then}",
                      headers={"Retry-After": "1"}, committed=exc.committed) from None
    log.warning(f"{what} done", extra={"shard": shard, "primary": report.new_primary,
                                       "epoch": report.new_epoch, "outcome": report.outcome})
    return web.json_response(report.to_json())
