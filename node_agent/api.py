"""The agent's HTTP API: the controller's primitives, for the operator and controllers only.

    GET  /agent/copies                     every copy: running, role, timeline, positions
    GET  /agent/copies/{shard}             the same document with that shard's copy alone
    POST /agent/copies/{shard}/promote     {"epoch": N}?  promote, then write the epoch row
    POST /agent/copies/{shard}/repoint     {"primary": "host:port"}
    POST /agent/copies/{shard}/sync        {"standbys": [...], "mode": "zone|region|off"}
    POST /agent/copies/{shard}/epoch       {"epoch": N}
    POST /agent/copies/{shard}/rewind      {"primary": "host:port"}
    POST /agent/copies/{shard}/stop        {"holdSeconds": N}?  down until start, or the hold ends
    POST /agent/copies/{shard}/start

Every route but `/agent/health` (up/down for Consul's check, nothing more) is for a
request signed by a failover controller or the operator, or carrying the operator token
(common/internal_auth.py), checked before routing.

Every primitive is idempotent: promoting a primary, repointing to the current source,
writing the stored epoch are successes that change nothing. A primitive sent under a
lease carries its sequencer (`X-Boxoffice-Sequencer`); one older than the newest the
agent has seen for that lease is refused 409 `stale-sequencer` (node_agent/sequencers.py).
Refusals are 409 problem documents (`not-running`, `not-a-primary`, `not-a-standby`, `epoch-lower`,
`map-primary`); a database that does not answer is a 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, get_args

from aiohttp import web

from common import internal_auth
from common.logs import request_id_middleware
from common.problems import Problem, problem_middleware
from common.sequencer import SEQUENCER_HEADER
from deploy.postgres import RewindError, SyncMode, parse_address
from node_agent.epoch import EpochLower
from node_agent.sequencers import SequencerFence
from node_agent.supervisor import DB_ERRORS, Copy, PrimitiveRefused, Supervisor

log = logging.getLogger("boxoffice.node_agent")

SUPERVISOR = web.AppKey("supervisor", Supervisor)
FENCE = web.AppKey("sequencer_fence", SequencerFence)
FENCED_PRIMITIVES = frozenset({"promote", "repoint", "sync", "epoch", "rewind", "stop", "start"})
MAX_BODY = 64 * 1024
SYNC_MODES = get_args(SyncMode)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


PUBLIC_PATHS = frozenset({"/agent/health"})  # liveness for Consul's check: no detail
CALLERS = frozenset({"operator", "controller"})  # who may call everything else


def policy(_: str, path: str) -> frozenset[str] | None:
    return None if path in PUBLIC_PATHS else CALLERS


@web.middleware
async def lease_fence(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A primitive that changes a server, sent under a lease, is refused when its
    sequencer is older than the newest seen for that lease (node_agent/sequencers.py)."""
    parts = request.path.strip("/").split("/")
    if (request.method == "POST" and len(parts) == 4 and parts[:2] == ["agent", "copies"]
            and parts[3] in FENCED_PRIMITIVES):
        await request.app[FENCE].check(request.headers.get(SEQUENCER_HEADER))
    return await handler(request)


@web.middleware
async def primitive_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map what a primitive can meet to problem documents (no addresses, no exception text)."""
    try:
        return await handler(request)
    except PrimitiveRefused as exc:
        raise Problem(409, exc.kind, exc.detail) from None
    except EpochLower as exc:
        raise Problem(409, "epoch-lower", "The database already holds a higher epoch.",
                      storedEpoch=exc.stored, epoch=exc.asked) from None
    except RewindError:
        log.exception("rewind failed")
        raise Problem(503, "rewind-failed", "The rewind failed; see the agent's log.") from None
    except DB_ERRORS:
        log.exception("database call failed", extra={"path": request.path})
        raise Problem(503, "database-unavailable", "The copy's database did not answer.") from None


def _copy(request: web.Request) -> Copy:
    copy = request.app[SUPERVISOR].get(request.match_info["shard"])
    if copy is None:
        raise Problem(404, "unknown-copy", "This agent owns no copy of that shard.")
    return copy


async def _body(request: web.Request, required: bool = True) -> dict[str, Any]:
    raw = await request.read()
    if not raw and not required:
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Problem(400, "invalid-json", "The request body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise Problem(400, "invalid-body", "The request body must be a JSON object.")
    return doc


def _epoch(doc: dict[str, Any], required: bool = True) -> int | None:
    value = doc.get("epoch")
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise Problem(400, "invalid-epoch", "'epoch' must be a non-negative integer.")
    return value


def _address(doc: dict[str, Any]) -> str:
    value = doc.get("primary")
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        _, port = parse_address(value)
        if not 0 < port < 65536:
            raise ValueError(value)
    except ValueError:
        raise Problem(400, "invalid-address", "'primary' must be \"host:port\".") from None
    return value


async def list_copies(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    # Probed at once (a failover's check waits for this answer); a snapshot of the dict,
    # which may change meanwhile.
    copies = list(await asyncio.gather(*(sup.status(c) for c in list(sup.copies.values()))))
    return _copies_document(sup, copies)


async def copy_status(request: web.Request) -> web.Response:
    """One copy's status, in the shape of the list (`copies` holds it alone): what a
    controller asks for one shard, without probing this host's other copies."""
    sup = request.app[SUPERVISOR]
    return _copies_document(sup, [await sup.status(_copy(request))])


def _copies_document(sup: Supervisor, copies: list[dict[str, Any]]) -> web.Response:
    service = sup.service
    return web.json_response({
        "region": sup.config.region,
        "zone": sup.config.zone,
        "host": sup.config.host_key,
        "mapLoaded": sup.watcher.current is not None,
        "mapStoreReachable": sup.watcher.healthy,
        "copies": copies,
        "service": None if sup.config.service is None else {
            "running": bool(service and service.running()),
            "pid": service.pid if service and service.running() else None,
            "restarts": sup.service_restarts,
        },
    })


async def promote(request: web.Request) -> web.Response:
    copy = _copy(request)
    epoch = _epoch(await _body(request, required=False), required=False)
    return web.json_response(await request.app[SUPERVISOR].promote(copy, epoch))


async def repoint(request: web.Request) -> web.Response:
    copy = _copy(request)
    primary = _address(await _body(request))
    changed = await request.app[SUPERVISOR].repoint(copy, primary)
    return web.json_response({"primary": primary, "changed": changed})


async def sync(request: web.Request) -> web.Response:
    copy = _copy(request)
    doc = await _body(request)
    mode, standbys = doc.get("mode"), doc.get("standbys", [])
    if mode not in SYNC_MODES:
        raise Problem(400, "invalid-mode", f"'mode' must be one of {', '.join(SYNC_MODES)}.")
    if not isinstance(standbys, list) or not all(isinstance(s, str) and s for s in standbys):
        raise Problem(400, "invalid-standbys", "'standbys' must be a list of copy names.")
    if (mode == "off") != (not standbys):
        raise Problem(400, "invalid-standbys", "'off' takes no standbys; 'zone' and 'region' need some.")
    value = await request.app[SUPERVISOR].set_sync(copy, standbys, mode)
    return web.json_response({"mode": mode, "standbys": standbys, "synchronousStandbyNames": value})


async def epoch(request: web.Request) -> web.Response:
    copy = _copy(request)
    value = _epoch(await _body(request))
    assert value is not None
    written = await request.app[SUPERVISOR].write_epoch(copy, value)
    return web.json_response({"epoch": written.epoch, "changed": written.changed})


async def rewind(request: web.Request) -> web.Response:
    copy = _copy(request)
    primary = _address(await _body(request))
    result = await request.app[SUPERVISOR].rewind(copy, primary)
    return web.json_response({"primary": primary, "rewound": bool(result and result.rewound)})


MAX_HOLD = 3600.0  # seconds: the longest stop an operator may ask for


async def stop(request: web.Request) -> web.Response:
    """Stop the copy; it stays down while the map stays where it is, at most the hold
    (`holdSeconds`, default node_agent/supervisor.py `STOP_HOLD`, shorter in a transition),
    or until `start`."""
    copy = _copy(request)
    value = (await _body(request, required=False)).get("holdSeconds")
    if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)
                              or not 0 < value <= MAX_HOLD):
        raise Problem(400, "invalid-hold",
                      f"'holdSeconds' must be a number of seconds in (0, {MAX_HOLD:.0f}].")
    hold = await request.app[SUPERVISOR].stop_copy(copy, None if value is None else float(value))
    return web.json_response({"running": False, "holdSeconds": hold})


async def start(request: web.Request) -> web.Response:
    copy = _copy(request)
    await request.app[SUPERVISOR].start_copy(copy)
    return web.json_response({"running": True})


async def crash(request: web.Request) -> web.Response:
    """Drills: the host's Postgres servers and booking service die (SIGKILL) and stay down."""
    return web.json_response({"killed": await request.app[SUPERVISOR].crash_host()})


async def recover(request: web.Request) -> web.Response:
    await request.app[SUPERVISOR].recover_host()
    return web.json_response({"recovering": True})


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def stop_service(request: web.Request) -> web.Response:
    """Drills: stop the host's booking service; it stays down until started."""
    await request.app[SUPERVISOR].stop_service()
    return web.json_response({"running": False})


async def start_service(request: web.Request) -> web.Response:
    await request.app[SUPERVISOR].start_service()
    return web.json_response({"running": True})


def sequencer_file(supervisor: Supervisor) -> Path:
    """The agent's own file of lease sequencers, per host: in its log directory, which
    is the agent's own (the state directory around it is root's when root runs `up`)."""
    host = supervisor.config.host_key.replace("/", "-")
    return supervisor.config.log_dir / f"node-agent-{host}-sequencers.json"


def make_app(supervisor: Supervisor, token: str | None,
             verifier: internal_auth.Verifier | None = None) -> web.Application:
    """The API; callers checked by `verifier` (default: the operator alone, by `token`;
    with neither, every route but the health check refuses everyone)."""
    if verifier is None:
        verifier = internal_auth.Verifier(
            {"operator": internal_auth.operator_key(token)} if token else {})
    app = web.Application(
        middlewares=[request_id_middleware, problem_middleware,
                     internal_auth.middleware(verifier, policy, lambda _: MAX_BODY), lease_fence,
                     primitive_errors],
        client_max_size=MAX_BODY,
    )
    app[SUPERVISOR] = supervisor
    app[FENCE] = SequencerFence(sequencer_file(supervisor))
    app.router.add_get("/agent/health", health)
    app.router.add_get("/agent/copies", list_copies)
    app.router.add_get("/agent/copies/{shard}", copy_status)
    app.router.add_post("/agent/service/stop", stop_service)
    app.router.add_post("/agent/service/start", start_service)
    app.router.add_post("/agent/drill/crash", crash)
    app.router.add_post("/agent/drill/recover", recover)
    for name, handler in (("promote", promote), ("repoint", repoint), ("sync", sync), ("epoch", epoch),
                          ("rewind", rewind), ("stop", stop), ("start", start)):
        app.router.add_post(f"/agent/copies/{{shard}}/{name}", handler)
    return app
