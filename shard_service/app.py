"""The booking service: one shard's API over its database.

It serves one copy of each of its shards (named by the copy's key in the
region map, `--shard member=`), read-write while that copy is the primary,
read-only while it is a replica: the role is derived at run time from the map
and the database (shard_service/roles.py), never from a start flag. It is the
only code that talks SQL. One process may serve several shards: each is
mounted under `/shards/<name>`; a process serving a single shard also answers
at the root (`/api/...`).

The handlers live beside it: reads in shard_service/reads.py, writes (book,
cancel, create an event) in shard_service/writes.py, an event move's steps in
shard_service/moves.py. Every write goes through the one write path,
shard_service/write_path.py: refused (503 `not-primary`) unless the derived role
is primary; the epoch it carries (`X-Boxoffice-Epoch` from the gateway, never
lower than this service's map: 503 `stale-epoch`) is checked by the database
itself against its epoch row, in the same round trip (503 `fenced`); a write whose
commit was not confirmed by a synchronous standby (the wait was cancelled) is 503
`not-confirmed`, never a success (shard_service/sync_wait.py).

Headers between gateway and service:
- `X-Boxoffice-Signature` (every request but health and readiness): the caller's
  signature (common/internal_auth.py); bookings and reads are for gateways and the
  operator, `/admin` routes for the operator and controllers (`caller_policy`).
- `X-Boxoffice-Lsn` (response to a write): the WAL position at which the
  write is committed; the gateway turns it into a consistency token.
- `X-Boxoffice-Min-Lsn` (request for a read): wait briefly until this copy
  has replayed that position; if it cannot, answer 503 `replica-behind` so
  the gateway reads from the primary instead. A copy whose role is unknown
  answers such a read 503 at once, and a fenced copy every read, with or
  without a token: an old primary (even one restarted in recovery before its
  rewind) serves no read (shard_service/reads.py).
- `X-Boxoffice-Min-Epoch` (request for a read, beside the position): the epoch
  of the token's entry; a copy whose epoch row is older answers 503
  `epoch-behind`, whatever its LSN (shard_service/roles.py `read_refusal`).
- `X-Boxoffice-Epoch` (request for a write): the shard epoch the gateway
  routed by (common/fencing.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import asyncpg
from aiohttp import web

from common.admission import SERVICE_DEFAULTS, ProtectionSettings, build_protection
from common.api import MAX_BODY_BYTES
from common.auth import (
    admin_auth_middleware,
    configured_token,
    is_admin_path,
    operator_authenticated,
    require_operator,
)
from common.internal_auth import middleware as internal_auth_middleware
from common.internal_auth import verifier_or_refuse
from common.logs import request_id_middleware
from common.metrics import metrics_middleware
from common.problems import Problem, problem_middleware
from region_map import MapStore, MapWatcher
from shard_service import audit, queries
from shard_service.combiner import BatchSettings, BookingCombiner
from shard_service.connections import fetch_one
from shard_service.http import json_response as _json
from shard_service.http import request_deadline as _deadline
from shard_service.moves import IMPORT_MAX_BYTES, MoveHandlers
from shard_service.reads import ReadHandlers
from shard_service.roles import Role, RoleTracker, RoleView
from shard_service.telemetry import install as install_telemetry
from shard_service.write_path import WritePath
from shard_service.writes import WriteHandlers

log = logging.getLogger("boxoffice.shard_service")

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
    """One shard copy: its connection pool, its role, and its handlers (reads, writes,
    moves) bound to them."""

    def __init__(self, config: ShardConfig, region: str, admin_token: str | None,
                 watcher: MapWatcher, batching: BatchSettings | None = None) -> None:
        self.config = config
        self.region = region
        self.admin_token = admin_token
        self.pool: asyncpg.Pool | None = None
        self.roles = RoleTracker(config.name, config.member, config.dsn, watcher)
        self.path = WritePath(config.name, config.member, self.roles, self._pool)
        # Bookings committed in batches (shard_service/combiner.py), or one CALL each.
        self.combiner = (BookingCombiner(config.name, self.path.connection, batching)
                         if batching is not None and batching.enabled else None)
        self.reads = ReadHandlers(config.name, self.roles, self.path.connection, admin_token)
        self.writes = WriteHandlers(self.path, self.combiner, admin_token)

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

    async def audit_event(self, request: web.Request) -> web.Response:
        """Operator: one event's inventory audit on this copy (shard_service/audit.py)."""
        require_operator(request, self.admin_token)
        async with self.path.connection(_deadline(request)) as conn:
            return await audit.audit_event(conn, request)

    def add_routes(self, app: web.Application, prefix: str = "") -> None:
        app.router.add_get(f"{prefix}/api/health", self.health)
        app.router.add_get(f"{prefix}/api/ready", self.ready)
        self.reads.add_routes(app, prefix)
        self.writes.add_routes(app, prefix)
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


OPEN_PATHS = ("/api/health", "/api/ready")  # Consul's checks: up/down (ready's detail: operator)
BOOKING_CALLERS = frozenset({"gateway", "operator"})
ADMIN_CALLERS = frozenset({"operator", "controller"})


def signed_body_limit(path: str) -> int:
    """The most body bytes read to verify a signature: an event move's import page on
    operator routes, a booking's otherwise (each handler enforces its own as well)."""
    return IMPORT_MAX_BYTES if is_admin_path(path) else MAX_BODY_BYTES


def caller_policy(_: str, path: str) -> frozenset[str] | None:
    """Who may call a path of the booking service (common/internal_auth.py): health and
    readiness anyone; operator routes the operator and controllers; the rest of `/api`
    and `/shards` (bookings, reads, and paths no route names there) gateways and the
    operator. Outside those prefixes no route exists: a 404 for anyone."""
    if is_admin_path(path):
        return ADMIN_CALLERS
    under_shard = path.startswith("/shards/")
    if under_shard:
        path = "/" + path[len("/shards/"):].partition("/")[2]
    if path in OPEN_PATHS:
        return None
    return BOOKING_CALLERS if under_shard or path.startswith("/api/") else None


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
                     problem_middleware,
                     internal_auth_middleware(verifier_or_refuse("booking service"), caller_policy,
                                              signed_body_limit),
                     admin_auth_middleware(token), *shedding.middlewares,
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
