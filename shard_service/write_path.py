"""The one write path of the booking service: every write goes through `WritePath.run`.

Bookings (one CALL each, or a batch through the combiner), cancels, event creation
and every step of an event move are each one CALL of a procedure (sql/) that checks
the epoch (and, for a step under a lease, the lease's sequencer), writes, commits and
answers (outcome, body, commit_lsn) in one round trip. Around that CALL the service
does the same things in the same order for all of them:

1. epoch       refused unless this copy is the map's primary and its role says so
               (503 `not-primary`); the gateway's epoch below the map's is 503
               `stale-epoch`; the call carries the higher of the two;
2. deadline    the caller's (`X-Boxoffice-Deadline-Ms`, bounded): running out of it,
               waiting for a connection or in the statement, is 503 `deadline-exceeded`;
3. connection  a pooled one, within the deadline (or the shard's combiner's batch);
4. sync wait   the connection is watched for a cancelled synchronous-replication wait
               (shard_service/sync_wait.py) for the call alone;
5. the call    one CALL, the epoch (and the lease's lock and sequencer) last;
6. fenced      the database refused the epoch (503 `fenced`) or the sequencer (409
               `stale-sequencer`: a newer holder of the lease has stepped since):
               nothing was written;
7. confirmed   a commit whose synchronous wait was cancelled is 503 `not-confirmed`,
               never a success.

A procedure that finds its work done (a retry) calls boxoffice_sync_mark before its
COMMIT, so that COMMIT too waits for the synchronous standbys: a success is never
answered for a write that exists only on this primary (sql/booking.sql, sql/moves.sql,
sql/events.sql). The outcome's own meaning (created, sold out, a move conflict, ...)
is the caller's business.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import asyncpg
from aiohttp import web
from asyncpg.pool import PoolConnectionProxy

from common.deadlines import Deadline
from common.fencing import EPOCH_HEADER, parse_epoch
from common.problems import Problem
from common.sequencer import SEQUENCER_HEADER, parse_fence
from shard_service.connections import Connection, fetch_one
from shard_service.http import request_deadline
from shard_service.roles import Role, RoleTracker
from shard_service.sync_wait import watch_sync_wait
from shard_service.telemetry import POOL_WAIT_SECONDS

ConnectionSource = Callable[[Deadline], AbstractAsyncContextManager[Connection]]


@dataclass(frozen=True)
class Committed:
    """A procedure's answer: its outcome, body (JSON text) and commit position;
    `confirmed` is False when the commit's synchronous wait was cancelled (committed
    here, not confirmed by a standby)."""

    outcome: str
    body: str | None
    lsn: str | None
    confirmed: bool

    def doc(self) -> dict[str, object]:
        value = json.loads(self.body) if self.body else {}
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class WriteCall:
    """What step 1 and 2 decided for a write: its epoch, the lease it runs under
    (lock, sequencer; None: not under a lease) and its deadline."""

    epoch: int
    lease: tuple[str, int] | None
    deadline: Deadline

    @property
    def fence_args(self) -> tuple[int, str | None, int | None]:
        """The last arguments of a procedure fenced by the epoch and the lease."""
        lock, sequencer = self.lease if self.lease is not None else (None, None)
        return self.epoch, lock, sequencer


Send = Callable[[WriteCall], Awaitable[Committed]]


def deadline_exceeded() -> Problem:
    """The caller's deadline passed: the service stops, and says it may have committed."""
    return Problem(
        503, "deadline-exceeded",
        "The request ran out of time and was stopped; a write was not made (unless it "
        "committed as it was stopped: send it again with the same key to find out).",
        headers={"Retry-After": "1"},
    )


def not_confirmed() -> Problem:
    return Problem(
        503, "not-confirmed",
        "The write committed on the primary, but no synchronous standby confirmed it: "
        "it may not survive a failover. Send it again with the same key: the retry "
        "answers it once it is durable.",
        headers={"Retry-After": "1"},
    )


async def commit(connection: ConnectionSource, deadline: Deadline, sql: str,
                 *args: object) -> tuple[asyncpg.Record, bool]:
    """Steps 3 to 5: a connection within `deadline`, watched for a cancelled synchronous
    wait, and the CALL. (The procedure's row, confirmed.) The combiner sends its batches
    through this too."""
    async with connection(deadline) as conn:
        with watch_sync_wait(conn) as sync:
            row = await fetch_one(conn, sql, *args, timeout=deadline.remaining())
    return row, not sync.cancelled


class WritePath:
    """The write path of one shard copy: its pool, its role, its map."""

    def __init__(self, shard: str, member: str, roles: RoleTracker,
                 pool: Callable[[], asyncpg.Pool]) -> None:
        self.shard = shard
        self.member = member
        self.roles = roles
        self._pool = pool

    @contextlib.asynccontextmanager
    async def connection(self, deadline: Deadline) -> AsyncIterator[PoolConnectionProxy]:
        """A pooled connection within the caller's deadline. Running out of time,
        waiting for the pool or in a statement (which is then cancelled, and rolls
        back), is a 503 `deadline-exceeded`: the caller has given up, so do we."""
        try:
            asked = time.monotonic()
            async with self._pool().acquire(timeout=deadline.remaining()) as conn:
                POOL_WAIT_SECONDS.labels(self.shard).observe(time.monotonic() - asked)
                yield conn
        except TimeoutError:
            raise deadline_exceeded() from None

    async def run(self, request: web.Request, send: Send) -> Committed:
        """Steps 1 to 7 for one write; `send` does 3 to 5 (`call` below, or the combiner)."""
        epoch = await self.epoch(request)
        try:
            lease = parse_fence(request.headers.get(SEQUENCER_HEADER))
        except ValueError:
            raise Problem(400, "invalid-sequencer",
                          f"{SEQUENCER_HEADER} is not <lock>:<sequencer>.") from None
        done = await send(WriteCall(epoch, lease, request_deadline(request)))
        if done.outcome == "fenced":
            raise self._fenced(done.body)
        if done.outcome == "stale_sequencer":
            details = done.doc()
            raise Problem(409, "stale-sequencer",
                          f"The lease {details.get('lock')} has been taken since this runner "
                          f"took it (sequencer {details.get('sequencer')}, newest "
                          f"{details.get('newest')}): nothing was written.",
                          sequencer=details.get("sequencer"), newest=details.get("newest"))
        if not done.confirmed:
            raise not_confirmed()
        return done

    async def call(self, request: web.Request, sql: str, *args: object,
                   fenced_by_lease: bool = False) -> Committed:
        """One write CALL through `run`: `args`, then the epoch (and, with
        `fenced_by_lease`, the lease's lock and sequencer)."""

        async def send(call: WriteCall) -> Committed:
            fence = call.fence_args if fenced_by_lease else (call.epoch,)
            row, confirmed = await commit(self.connection, call.deadline, sql, *args, *fence)
            return Committed(row[0], row[1], row[2], confirmed)

        return await self.run(request, send)

    async def epoch(self, request: web.Request) -> int:
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
        if view.role is not Role.PRIMARY and shard is not None and shard.primary_copy == self.member:
            # The map names this copy primary but the last check said otherwise: it may
            # have just been promoted and its epoch written. Look again (shared, at
            # most one check per 50 ms) rather than refuse on a stale view.
            view = await self.roles.refresh(max_age=0.05)
            shard = self.roles.map_shard()
        if view.role is not Role.PRIMARY or shard is None or shard.primary_copy != self.member:
            raise Problem(503, "not-primary",
                          f"This copy of {self.shard} is not its primary now.",
                          headers={"Retry-After": "1"}, role=str(view.role))
        if asked is not None and asked < shard.epoch:
            raise Problem(503, "stale-epoch",
                          f"The request was routed by epoch {asked} of {self.shard}; "
                          f"the map is at epoch {shard.epoch}.",
                          headers={"Retry-After": "1"}, epoch=shard.epoch)
        return max(asked or 0, shard.epoch)

    def _fenced(self, doc: str | None) -> Problem:
        """The database refused the write's epoch; look at the role again soon."""
        self.roles.poke()
        details = json.loads(doc) if doc else {}
        return Problem(503, "fenced",
                       f"This copy's database is not the primary of epoch {details.get('asked')} "
                       f"of {self.shard}; nothing was written.",
                       headers={"Retry-After": "1"}, epoch=details.get("epoch"))
