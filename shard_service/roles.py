"""A shard copy's role, derived at run time from the map and from its database.

Nothing reads a role from a start flag. A copy (named by its key in the shard
record's `members`: `us-east`, `us-east/b`) is

- `primary`  when the map names it the primary, its database is not in
             recovery, and the database's epoch row equals the map's epoch;
- `replica`  when the map names another copy the primary, its database is in
             recovery, AND its epoch row equals the map's epoch: it has replayed the
             row the map's primary wrote as its first write after its promotion, so
             it is on that primary's history (its timeline, past the fork);
- `fenced`   when the map and the database disagree: the map names it primary
             but its database is in recovery (a promotion under way) or holds
             another epoch (the epoch row not yet written); the map names
             another primary while its database is not in recovery (a stale
             primary, e.g. an old primary started again by hand); or the map
             names another primary and the database is in recovery with an older
             epoch row (or none): an old primary restarted as a standby before it
             was rewound (it still holds commits nobody confirmed), a standby that
             follows an old primary, or a standby that has not yet replayed the
             new primary's epoch row (for the few milliseconds after a promotion:
             the tracker looks again every `CATCH_UP_INTERVAL_SECONDS` meanwhile);
- `unknown`  when there is no map yet (or the map does not name this copy),
             the database does not answer, or the database's epoch row is ahead
             of the map's (this service's map has not caught up yet).

`/api/ready` (and so the copy's Consul check) passes only for `primary` and
`replica`. A `fenced` copy serves no read at all, with or without a consistency
token, and an `unknown` one no read for a token (`read_refusal`;
shard_service/reads.py). Writes need `primary`, but the database has the last word:
the booking procedures compare the caller's epoch with the epoch row, so a role
derived a moment ago can never let a fenced write through.

A consistency token's entry carries the epoch of its write beside its LSN
(gateway/consistency.py): a copy whose epoch row is older than the entry's epoch
does not serve it (`read_refusal`), whatever its LSN, even when its own map is
behind (an old primary whose service still has the old map derives `primary`).

`RoleTracker` re-derives the role every `interval` seconds and at once on
every map change, over its own connection (one query: `COPY_STATE`), so a
saturated pool can not make a healthy copy look unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from region_map import RegionMap, Shard
from region_map.watcher import MapWatcher
from shard_service import queries
from shard_service.connections import fetch_one

log = logging.getLogger("boxoffice.shard_service.roles")

CHECK_INTERVAL_SECONDS = 0.5
CATCH_UP_INTERVAL_SECONDS = 0.05  # while a standby has not replayed the map's epoch row
CHECK_TIMEOUT_SECONDS = 1.0


class Role(enum.StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"
    FENCED = "fenced"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class DatabaseState:
    """What the copy's database says about itself."""

    in_recovery: bool
    epoch: int | None  # the epoch row; None when there is none


@dataclass(frozen=True)
class RoleView:
    """A derived role, with what it was derived from."""

    role: Role
    reason: str
    shard: Shard | None = None  # the map's record of the shard
    database: DatabaseState | None = None
    checked_at: float = 0.0  # time.monotonic() of the database check

    @property
    def map_epoch(self) -> int | None:
        return self.shard.epoch if self.shard is not None else None

    @property
    def consistent(self) -> bool:
        """The copy is what the map says it is."""
        return self.role in (Role.PRIMARY, Role.REPLICA)

    def to_json(self) -> dict[str, Any]:
        return {
            "role": str(self.role),
            "reason": self.reason,
            "mapEpoch": self.map_epoch,
            "mapPrimary": self.shard.primary_copy if self.shard is not None else None,
            "databaseEpoch": self.database.epoch if self.database is not None else None,
            "inRecovery": self.database.in_recovery if self.database is not None else None,
        }


def derive_role(shard: Shard | None, member: str, database: DatabaseState | None,
                checked_at: float = 0.0) -> RoleView:
    """The role of copy `member` of `shard` (None: no map yet) whose database is in
    `database` (None: it did not answer). See the module docstring."""

    def view(role: Role, reason: str) -> RoleView:
        return RoleView(role, reason, shard, database, checked_at)

    if shard is None:
        return view(Role.UNKNOWN, "no region map with this shard yet")
    if member not in shard.members:
        return view(Role.UNKNOWN, f"the map does not name copy {member!r} of {shard.name}")
    if database is None:
        return view(Role.UNKNOWN, "the database does not answer")
    if shard.primary_copy == member:
        if database.in_recovery:
            return view(Role.FENCED, "the map names this copy primary; its database is in recovery")
        if database.epoch != shard.epoch:
            return view(Role.FENCED, f"the map is at epoch {shard.epoch}; the database's epoch "
                                     f"row says {database.epoch}")
        return view(Role.PRIMARY, f"the primary of epoch {shard.epoch}")
    if not database.in_recovery:
        return view(Role.FENCED, f"the map names {shard.primary_copy} primary at epoch "
                                 f"{shard.epoch}; this copy's database is not in recovery")
    if database.epoch is not None and database.epoch > shard.epoch:
        return view(Role.UNKNOWN, f"the database's epoch row says {database.epoch}; the map "
                                  f"is at epoch {shard.epoch} (not caught up yet)")
    if database.epoch != shard.epoch:
        return view(Role.FENCED, f"in recovery, but not on the history of {shard.primary_copy}, "
                                 f"the primary of epoch {shard.epoch}: its epoch row says "
                                 f"{database.epoch} (an old primary not yet rewound, a standby "
                                 "of an old primary, or the promotion not yet replayed)")
    return view(Role.REPLICA, f"a replica of {shard.primary_copy} (epoch {shard.epoch})")


def read_refusal(view: RoleView, wanted_epoch: int = 0, token: bool = False) -> tuple[str, str] | None:
    """Why this copy may not serve a read now (a problem type and its detail), or None.

    A `fenced` copy serves no read at all: it is known not to be on the map's primary's
    history (an old primary, restarted or not, shows commits nobody confirmed). A read
    for a consistency token (`token`) needs role primary or replica (an `unknown` copy
    cannot say where it is; an anonymous read is still served there, as a copy whose
    role check timed out under load still answers), and, for a token entry of epoch
    `wanted_epoch`, a database epoch row at least that epoch: a copy on an older epoch's
    history never satisfies a token, whatever its LSN."""
    if view.role is Role.FENCED or (token and view.role is not Role.PRIMARY
                                    and view.role is not Role.REPLICA):
        # A stale primary would satisfy any position with writes the shard never
        # had; an unknown copy cannot say. Either way: read another copy.
        return ("fenced" if view.role is Role.FENCED else "role-unknown",
                f"This copy cannot serve a consistent read now ({view.reason}); read another copy.")
    if not token:
        return None
    held = view.database.epoch if view.database is not None else None
    if wanted_epoch and (held is None or held < wanted_epoch):
        return ("epoch-behind", f"The read asks for the history of epoch {wanted_epoch}; this "
                                f"copy is on epoch {held}'s. Read another copy.")
    return None


class RoleTracker:
    """Keeps `view` (the derived role of one copy) fresh: every `interval` seconds,
    on every map change, and on demand (`refresh`)."""

    def __init__(self, shard_name: str, member: str, dsn: str, watcher: MapWatcher,
                 interval: float = CHECK_INTERVAL_SECONDS) -> None:
        self.shard_name = shard_name
        self.member = member
        self.dsn = dsn
        self.watcher = watcher
        self.interval = interval
        self._view = RoleView(Role.UNKNOWN, "not checked yet")
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one database check at a time
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unlisten: Callable[[], None] | None = None

    @property
    def view(self) -> RoleView:
        return self._view

    def map_shard(self) -> Shard | None:
        current = self.watcher.current
        return current.shards.get(self.shard_name) if current is not None else None

    async def start(self) -> None:
        self._unlisten = self.watcher.add_listener(self._map_changed)
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name=f"role-{self.shard_name}")

    async def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close()

    def poke(self) -> None:
        """Check again soon (the database refused a write's epoch)."""
        self._wake.set()

    def _map_changed(self, _: RegionMap) -> None:
        self._wake.set()

    def _next_check(self) -> float:
        """Seconds until the next check: soon while a standby has not yet replayed the map's
        epoch row (after a promotion it arrives within milliseconds; until then the copy
        serves no read)."""
        view = self._view
        behind = (view.role is Role.FENCED and view.database is not None
                  and view.database.in_recovery and view.shard is not None
                  and view.shard.primary_copy != self.member)
        return min(self.interval, CATCH_UP_INTERVAL_SECONDS) if behind else self.interval

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._next_check())
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:  # never let the loop die: the role would freeze
                log.exception("role check failed", extra={"shard": self.shard_name})

    async def refresh(self, max_age: float = 0.0) -> RoleView:
        """Derive the role now, unless a check younger than `max_age` seconds is known
        (concurrent callers share one check)."""
        asked_at = time.monotonic()
        async with self._lock:
            if self._view.checked_at and self._view.checked_at >= asked_at - max_age:
                return self._view
            checked_at = time.monotonic()
            database = await self._read_database()
            new = derive_role(self.map_shard(), self.member, database, checked_at)
            old, self._view = self._view, new
        if new.role != old.role:
            log.info("copy role is now %s", new.role,
                     extra={"shard": self.shard_name, "copy": self.member, "reason": new.reason})
        return new

    async def _read_database(self) -> DatabaseState | None:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(
                    self.dsn, timeout=CHECK_TIMEOUT_SECONDS,
                    server_settings={"application_name": f"boxoffice-{self.shard_name}-role"},
                )
            try:
                row = await fetch_one(self._conn, queries.COPY_STATE, timeout=CHECK_TIMEOUT_SECONDS)
            except asyncpg.UndefinedTableError:  # no epoch table: no epoch
                in_recovery = await self._conn.fetchval(queries.IN_RECOVERY,
                                                        timeout=CHECK_TIMEOUT_SECONDS)
                return DatabaseState(bool(in_recovery), None)
            return DatabaseState(bool(row["in_recovery"]),
                                 None if row["epoch"] is None else int(row["epoch"]))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if self._view.database is not None:
                log.warning("role check: database unavailable",
                            extra={"shard": self.shard_name, "error": repr(exc)})
            await self._close()
            return None

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), CHECK_TIMEOUT_SECONDS)
