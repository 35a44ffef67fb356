"""Supervision: every copy runs, in the role the region map gives it.

Rules (Patroni's, with one difference: Consul being unreachable never by itself
promotes or demotes anything):

- A copy is (re)started as the primary only when the map names it primary and its data
  directory was last run as a primary. A copy the map names primary but that was a
  standby starts as a standby of nothing and waits: promotion (a timeline switch) is the
  controller's primitive, never a side effect of a restart.
- Any other copy is (re)started as a standby of the map's primary, rewound first when its
  timeline differs from the primary's (pg_rewind decides whether they really diverged).
  When the primary cannot be reached it starts as a standby anyway, unrewound; the
  repair rule below rewinds it once the primary answers.
- With no map loaded yet (Consul unreachable since the agent started) nothing is
  started: the agent waits. A map loaded once is kept while Consul is unreachable.
- A running primary that the map no longer names is demoted (fast shutdown, rewind,
  standby of the map's primary), but only when the map's epoch is higher than every
  epoch this copy was promoted with or holds in its epoch row: a map that has not caught
  up with a promotion never demotes the new primary.
- A standby follows the map's primary, continuously (issue 16, class 6): one that
  streams from a primary the map does not name (an old primary the promotion could not
  repoint it away from, its agent being unreachable) is repointed to the map's primary
  at the next round: it would otherwise confirm commits of that old primary which its
  rewind later discards. Streaming from a standby (cascading, as a promotion sets up
  before its commit point) is left alone: it receives the same WAL one hop later, and
  that standby's own agent applies this rule to it.
- A standby that has not streamed for `REPAIR_AFTER` seconds while the map's primary
  answers on another timeline is restarted through the same rewind path (a diverged
  history makes its WAL receiver fail for ever); on the same timeline, or while the
  map's primary does not answer, it is repointed to the map's primary if its
  primary_conninfo names another server (set by hand, or left by an interrupted
  promotion), and looked at again after another `REPAIR_AFTER`.
- A booking-service process that exits is started again with the same command.
- A rewind that fails (pg_rewind, or the crash recovery before it: "could not find common
  ancestor", "invalid record length" after an interrupted rewind) `REWIND_ATTEMPTS` times
  in a row is not tried again: the copy is re-created from a fresh base backup of the
  map's primary (`PostgresServer.rebuild_from`, the old directory moved aside), as
  Patroni does with `remove_data_directory_on_rewind_failure`; so is a standby whose data
  directory holds no cluster (an interrupted rebuild). A standby never stays down for
  good because of a failed rewind.
- Each copy is reconciled on its own: an exception in one is logged and counted
  (`failures`, `lastError` in its status), and that copy is retried after a back-off
  (`FAILURE_BACKOFF` doubling to `MAX_BACKOFF`); the other copies go on.
- An operator's stop (`stop_copy`: drills, a switchover's `stop` step) is never kept for
  good: it holds while the map stays where it was when the copy was stopped (the same
  epoch; the same transition, if one was set) and for at most `STOP_HOLD_IN_TRANSITION`
  seconds (stopped under a transition: a switchover) or `STOP_HOLD` (otherwise), on this
  agent's own monotonic clock. Then the copy runs in its map role again: a switchover
  whose runner died or was overtaken after stopping the old primary does not leave it
  down. A drill's host crash (`crash_host`) holds until `recover_host`.

Each copy has a lock: supervision and the HTTP primitives never act on a copy at once.
Processes are spawned from the event loop's thread (their parent-death signal is tied
to the spawning thread); slow pg tools run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from deploy.postgres import (
    PostgresServer,
    RewindError,
    RewindResult,
    SyncMode,
    address_dsn,
    parse_address,
    primary_timeline,
)
from deploy.procs import ManagedProcess
from node_agent.config import AgentConfig, CopyConfig
from node_agent.epoch import EpochWrite, NotPrimary, read_epoch, write_epoch
from region_map import MapError, MapWatcher, Shard

log = logging.getLogger("boxoffice.node_agent")

TICK = 0.2  # seconds between supervision rounds (a dead process is seen within this)
REPAIR_AFTER = 3.0  # seconds a standby may go without streaming before it is checked
REWIND_ATTEMPTS = 3  # failed rewinds in a row before the copy is rebuilt from a base backup
FAILURE_BACKOFF = 0.5  # seconds before a copy whose reconciliation failed is tried again...
MAX_BACKOFF = 10.0  # ...doubling per failure in a row, up to this
STOP_HOLD = 600.0  # seconds an operator's stop holds at most (drills)
STOP_HOLD_IN_TRANSITION = 30.0  # ... when made under a transition (a switchover's stop step)
READY_TIMEOUT = 60.0
FRESH_READ_TIMEOUT = 1.0
DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class PrimitiveRefused(Exception):
    """A primitive that cannot apply to the copy in its current state (HTTP 409)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class OperatorStop:
    """Why a copy is kept down: what the map said when it was stopped, and until when
    (this agent's monotonic clock)."""

    until: float
    epoch: int | None
    transition: Any  # the shard's transition then (None: none)

    def released(self, shard: Shard | None, now: float) -> str | None:
        """Why the stop no longer holds, or None while it does."""
        if now >= self.until:
            return "its hold ran out"
        if shard is not None and self.epoch is not None and shard.epoch > self.epoch:
            return f"the map moved on (epoch {self.epoch} -> {shard.epoch})"
        if self.transition is not None and (shard is None or shard.transition != self.transition):
            return "the transition it was stopped under ended"
        return None


@dataclass
class Copy:
    config: CopyConfig
    server: PostgresServer
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    operator_stop: OperatorStop | None = None
    started_once: bool = False
    restarts: int = 0
    claimed_epoch: int = 0  # the highest epoch this agent promoted it with or wrote
    not_streaming_since: float | None = None
    repoints: int = 0  # by supervision (a standby found following another server)
    waiting_logged: str = ""
    last_start: dict[str, Any] | None = None  # role, rewound, map epoch of the last (re)start
    failures: int = 0  # reconciliations that raised, in a row
    errors: int = 0  # reconciliations that raised, in all
    last_error: str | None = None
    retry_at: float = 0.0  # monotonic: not reconciled again before (back-off)
    rewind_failures: int = 0  # in a row
    rebuilds: int = 0  # re-created from a base backup
    rebuilt: bool = False  # by the (re)start under way

    @property
    def operator_stopped(self) -> bool:
        return self.operator_stop is not None

    @property
    def name(self) -> str:
        return self.config.name


def map_says_primary(shard: Shard, copy: CopyConfig) -> bool:
    return shard.primary_copy == copy.member


def same_address(a: str, b: str) -> bool:
    """Whether two "host:port" addresses are the same (the WAL receiver's sender is
    written as its conninfo's host and port, which supervision sets from the map)."""
    try:
        return parse_address(a) == parse_address(b)
    except ValueError:
        return False


class Supervisor:
    def __init__(self, config: AgentConfig, watcher: MapWatcher, tick: float = TICK) -> None:
        self.config = config
        self.watcher = watcher
        self.tick = tick
        config.log_dir.mkdir(parents=True, exist_ok=True)
        self.copies: dict[str, Copy] = {
            c.shard: Copy(c, PostgresServer(c.name, c.data_dir, c.port, durable=config.durable, host=c.host,
                                            credentials=config.credentials))
            for c in config.copies
        }
        self.service: ManagedProcess | None = None
        self.service_restarts = 0
        self.service_stopped = False  # by the operator (drills): not restarted until started
        self.host_crashed = False  # drills: every copy down until recover_host
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unlisten = watcher.add_listener(lambda _map: self._wake.set())

    # -- lifetime ------------------------------------------------------------------
    async def start(self) -> None:
        for copy in self.copies.values():
            if await asyncio.to_thread(copy.server.stop_stray_postmaster):
                log.warning("stopped a postmaster this agent did not start", extra={"copy": copy.name})
        self._task = asyncio.create_task(self._run(), name="node-agent-supervisor")

    async def stop(self) -> None:
        self._unlisten()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.service is not None:
            await asyncio.to_thread(self.service.stop)
        await asyncio.gather(*(asyncio.to_thread(c.server.stop) for c in self.copies.values()))

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.reconcile_once()
            except Exception:
                log.exception("supervision round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick)

    async def reconcile_once(self) -> None:
        self._supervise_service()
        for copy in self.copies.values():
            if copy.lock.locked() or time.monotonic() < copy.retry_at:
                continue  # a primitive is working on it, or it failed a moment ago
            try:
                async with copy.lock:
                    await self._reconcile(copy)
            except Exception as exc:  # isolated: one copy's failure is not the others'
                copy.failures += 1
                copy.errors += 1
                copy.last_error = f"{type(exc).__name__}: {exc}"[:2000]
                delay = min(FAILURE_BACKOFF * 2 ** (copy.failures - 1), MAX_BACKOFF)
                copy.retry_at = time.monotonic() + delay
                log.exception("supervision of a copy failed; the others go on, it is tried again "
                              "after a back-off", extra={"copy": copy.name, "failures": copy.failures,
                                                         "retry_in": delay})
            else:
                copy.failures = 0

    # -- the booking service -----------------------------------------------------------
    def _supervise_service(self) -> None:
        spec = self.config.service
        if spec is None or self.service_stopped or (self.service is not None and self.service.running()):
            return
        if self.service is not None:
            self.service_restarts += 1
            code = self.service.popen.returncode if self.service.popen else None
            log.warning("booking service exited; starting it again", extra={"code": code})
        self.service = ManagedProcess(
            f"booking-service[{self.config.host_key}]", spec.argv,
            self.config.log_dir / f"shard_service-{self.config.host_key.replace('/', '-')}.log",
            env={**os.environ, **spec.env}, stop_signal=signal.SIGTERM, death_signal=signal.SIGTERM,
        )
        self.service.start()

    async def crash_host(self) -> list[str]:
        """Drills (`POST /agent/drill/crash`): the host dies as it would by power loss —
        every Postgres server and the booking service SIGKILLed — and stays down
        (supervision suspended for them) until `recover_host`. The agent itself keeps
        answering so the drill can bring the host back; to the rest of the platform the
        host is gone: no database, no booking service, Consul's checks fail."""
        killed = []
        self.service_stopped = True
        if self.service is not None and self.service.running():
            await asyncio.to_thread(self.service.kill)
            killed.append(self.service.name)
        self.host_crashed = True
        for copy in self.copies.values():
            async with copy.lock:
                if copy.server.running():
                    await asyncio.to_thread(copy.server.crash)
                    killed.append(copy.name)
        log.warning("drill: host crashed", extra={"killed": killed})
        return killed

    async def recover_host(self) -> None:
        """Drills: the crashed host comes back; supervision starts everything again in
        its map role (an old primary rejoins as a rewound standby)."""
        self.host_crashed = False
        for copy in self.copies.values():
            copy.operator_stop = None
        await self.start_service()
        self._wake.set()
        log.warning("drill: host recovered")

    async def stop_service(self) -> None:
        self.service_stopped = True
        if self.service is not None:
            await asyncio.to_thread(self.service.stop)
        log.warning("booking service stopped by the operator")

    async def start_service(self) -> None:
        if self.service_stopped:
            self.service_stopped = False
            if self.service is not None and not self.service.running():
                self.service = None  # a start asked for, not a restart after a crash
        self._supervise_service()

    # -- copies ----------------------------------------------------------------------
    def shard_of(self, copy: Copy) -> Shard | None:
        current = self.watcher.current
        return current.shards.get(copy.config.shard) if current is not None else None

    async def _reconcile(self, copy: Copy) -> None:
        if self.host_crashed:
            return
        shard = self.shard_of(copy)
        if copy.operator_stop is not None:
            why = copy.operator_stop.released(shard, time.monotonic())
            if why is None:
                return
            copy.operator_stop = None
            log.warning("the operator's stop no longer holds: starting the copy in its map role",
                        extra={"copy": copy.name, "why": why})
        if not copy.server.running():
            if copy.started_once:
                process = copy.server.process
                code = process.popen.returncode if process and process.popen else None
                log.warning("postgres exited; starting it again in its map role",
                            extra={"copy": copy.name, "code": code})
            await self._start_in_map_role(copy, shard)
            return
        if shard is not None and not map_says_primary(shard, copy.config):
            await self._check_standby(copy, shard)

    async def _start_in_map_role(self, copy: Copy, shard: Shard | None) -> None:
        server = copy.server
        if shard is None:
            if copy.waiting_logged != "no-map":
                log.warning("no region map (or no record of this shard) yet: not starting",
                            extra={"copy": copy.name})
                copy.waiting_logged = "no-map"
            return
        copy.waiting_logged = ""
        if map_says_primary(shard, copy.config):
            shard = await self._fresh(shard)
        rewound = False
        copy.rebuilt = False
        if map_says_primary(shard, copy.config):
            if server.was_standby():
                log.warning("the map names this standby primary: starting it as a standby "
                            "until it is promoted", extra={"copy": copy.name, "epoch": shard.epoch})
                await asyncio.to_thread(server.prepare_standby, None)
            else:
                await asyncio.to_thread(server.wait_stopped)
            role = "primary"
        else:
            primary = self.config.physical(shard.primary.db_address)
            result = await self._rewind_if_needed(copy, primary)
            rewound = bool(result and result.rewound)
            await asyncio.to_thread(server.prepare_standby, primary)
            role = "standby"
        server.start(wait=False)
        if copy.started_once:
            copy.restarts += 1
        copy.started_once = True
        copy.not_streaming_since = None
        copy.last_start = {"role": role, "rewound": rewound, "rebuilt": copy.rebuilt, "epoch": shard.epoch}
        log.info("postgres started", extra={"copy": copy.name, "role": role, "epoch": shard.epoch})

    async def _fresh(self, shard: Shard) -> Shard:
        """The shard record read from the store now, if it answers quickly: before a copy is
        (re)started as the primary, a watched map that has not caught up (an agent that was
        cut off or frozen) must not decide. If the store does not answer, the watched map
        decides: an unreachable store changes no role."""
        try:
            fresh, _ = await asyncio.wait_for(self.watcher.store.read_shard(shard.name), FRESH_READ_TIMEOUT)
        except (MapError, TimeoutError):
            return shard
        return fresh if fresh.epoch >= shard.epoch else shard

    async def _rewind_if_needed(self, copy: Copy, primary: str) -> RewindResult | None:
        timeline = await primary_timeline(primary, self.config.credentials)
        if timeline is None:
            log.warning("the map's primary does not answer as a primary: not rewinding now",
                        extra={"copy": copy.name})
            return None
        server = copy.server
        if not await asyncio.to_thread(server.has_data):
            log.error("the data directory holds no cluster: re-creating it from a base backup of "
                      "the map's primary", extra={"copy": copy.name, "primary": primary})
            return await self._rebuild(copy, primary)
        if not await asyncio.to_thread(server.rewind_needed, timeline):
            copy.rewind_failures = 0
            return None
        try:
            result = await asyncio.to_thread(server.rewind, address_dsn(primary, self.config.credentials))
        except RewindError as exc:
            copy.rewind_failures += 1
            if copy.rewind_failures < REWIND_ATTEMPTS:
                log.error("rewind failed; tried again after a back-off, then rebuilt from a base "
                          "backup", extra={"copy": copy.name, "attempt": copy.rewind_failures,
                                           "attempts": REWIND_ATTEMPTS, "error": str(exc)[-2000:]})
                raise
            log.error("rewind failed %d times in a row (an interrupted rewind can leave a data "
                      "directory that no rewind recovers): re-creating the copy from a base backup "
                      "of the map's primary", copy.rewind_failures,
                      extra={"copy": copy.name, "primary": primary, "error": str(exc)[-2000:]})
            return await self._rebuild(copy, primary)
        copy.rewind_failures = 0
        log.warning("rewound" if result.rewound else "no rewind required",
                    extra={"copy": copy.name, "timeline": timeline, "crash_recovery": result.crash_recovery})
        return result

    async def _rebuild(self, copy: Copy, primary: str) -> RewindResult:
        """Re-create the stopped copy from a base backup of `primary` (a physical address)."""
        started = time.monotonic()
        await asyncio.to_thread(copy.server.rebuild_from, primary)
        copy.rewind_failures = 0
        copy.rebuilds += 1
        copy.rebuilt = True
        log.warning("copy re-created from a base backup", extra={
            "copy": copy.name, "primary": primary, "seconds": round(time.monotonic() - started, 2)})
        return RewindResult(False, False, "re-created from a base backup")

    async def _check_standby(self, copy: Copy, shard: Shard) -> None:
        """A running copy the map does not name primary: demote it if it is a primary,
        repair it if it is a standby that cannot follow."""
        try:
            pos = await copy.server.positions()
        except DB_ERRORS:
            return  # starting, or busy: the next round looks again
        if not pos.in_recovery:
            stored = await self._stored_epoch(copy)
            if shard.epoch > max(stored, copy.claimed_epoch):
                log.warning("demoting: the map names another copy primary",
                            extra={"copy": copy.name, "map_epoch": shard.epoch, "stored_epoch": stored})
                await self._restart_as_standby(copy, self.config.physical(shard.primary.db_address))
            return
        primary = self.config.physical(shard.primary.db_address)
        if pos.streaming:
            copy.not_streaming_since = None
            if pos.sender is not None and not same_address(pos.sender, primary):
                # Another primary than the map's (an isolated old primary)? A standby
                # upstream is a cascade: harmless, its own agent follows the map.
                if await primary_timeline(pos.sender, self.config.credentials) is not None:
                    log.warning("standby streams from a primary the map does not name: "
                                "repointing it to the map's primary",
                                extra={"copy": copy.name, "sender": pos.sender, "primary": primary})
                    await self._repoint_to(copy, primary)
            return
        now = time.monotonic()
        if copy.not_streaming_since is None:
            copy.not_streaming_since = now
            return
        if now - copy.not_streaming_since < REPAIR_AFTER:
            return
        copy.not_streaming_since = None
        timeline = await primary_timeline(primary, self.config.credentials)
        if timeline is None or timeline == pos.timeline:
            if await self._repoint_to(copy, primary):
                log.warning("standby not streaming and following another server than the "
                            "map's primary: repointed", extra={"copy": copy.name, "primary": primary})
            return
        log.warning("standby not streaming while the primary answers on another timeline: "
                    "restarting it through a rewind", extra={"copy": copy.name, "timeline": timeline})
        await self._restart_as_standby(copy, primary)

    async def _repoint_to(self, copy: Copy, primary: str) -> bool:
        """Point the running standby at `primary` (a physical address), without a restart;
        False if it already pointed there (or is no standby, or does not answer)."""
        host, port = parse_address(primary)
        try:
            changed = await copy.server.repoint(host, port)
        except (RuntimeError, *DB_ERRORS):
            return False  # promoted or stopped meanwhile: the next round looks again
        if changed:
            copy.repoints += 1
        return changed

    async def _stored_epoch(self, copy: Copy) -> int:
        try:
            return await read_epoch(copy.server.dsn) or 0
        except DB_ERRORS:
            return 0

    async def _restart_as_standby(self, copy: Copy, primary: str, force_rewind: bool = False
                                  ) -> RewindResult | None:
        server = copy.server
        if force_rewind and await primary_timeline(primary, self.config.credentials) is None:
            raise PrimitiveRefused("primary-unavailable", "That primary does not answer as a primary.")
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.wait_stopped)
        copy.rebuilt = False
        if force_rewind:
            source = address_dsn(primary, self.config.credentials)
            result: RewindResult | None = await asyncio.to_thread(server.rewind, source)
        else:
            result = await self._rewind_if_needed(copy, primary)
        await asyncio.to_thread(server.prepare_standby, primary)
        server.start(wait=False)
        copy.restarts += 1
        copy.not_streaming_since = None
        shard = self.shard_of(copy)
        copy.last_start = {"role": "standby", "rewound": bool(result and result.rewound),
                           "rebuilt": copy.rebuilt, "epoch": shard.epoch if shard else None}
        return result

    # -- primitives (the HTTP API calls these) -------------------------------------------
    def get(self, shard: str) -> Copy | None:
        return self.copies.get(shard)

    def _require_running(self, copy: Copy) -> None:
        if not copy.server.running():
            raise PrimitiveRefused("not-running", "That copy's server is not running.")

    async def status(self, copy: Copy) -> dict[str, Any]:
        server = copy.server
        shard = self.shard_of(copy)
        doc: dict[str, Any] = {
            "shard": copy.config.shard,
            "name": copy.name,
            "address": copy.config.address,
            "running": server.running(),
            "pid": server.process.pid if server.running() and server.process else None,
            "operatorStopped": copy.operator_stopped or self.host_crashed,
            "stopHoldSeconds": None if copy.operator_stop is None else
            round(max(0.0, copy.operator_stop.until - time.monotonic()), 1),
            "restarts": copy.restarts,
            "failures": copy.failures,
            "errors": copy.errors,
            "lastError": copy.last_error,
            "rewindFailures": copy.rewind_failures,
            "rebuilds": copy.rebuilds,
            "repoints": copy.repoints,
            "lastStart": copy.last_start,
            "mapRole": None if shard is None else
            ("primary" if map_says_primary(shard, copy.config) else "standby"),
            "mapEpoch": None if shard is None else shard.epoch,
            "role": None,
            "timeline": None,
            "positions": None,
            "epoch": None,
        }
        if doc["running"]:
            try:
                pos, stored = await asyncio.gather(server.positions(), read_epoch(server.dsn))
                doc.update(role=pos.role, timeline=pos.timeline, positions=pos.to_json(), epoch=stored)
            except DB_ERRORS:
                pass  # starting: role unknown yet
            except Exception as exc:  # an observation never fails the whole status
                log.exception("status probe failed", extra={"copy": copy.name})
                doc["probeError"] = type(exc).__name__
        return doc

    async def promote(self, copy: Copy, epoch: int | None) -> dict[str, Any]:
        async with copy.lock:
            self._require_running(copy)
            if epoch is not None:
                copy.claimed_epoch = max(copy.claimed_epoch, epoch)
            started = time.monotonic()
            promoted = await copy.server.promote()
            out_of_recovery = time.monotonic()
            written = await self._write_epoch(copy, epoch) if epoch is not None else None
            timings = {"promoteSeconds": round(out_of_recovery - started, 4),
                       "epochSeconds": round(time.monotonic() - out_of_recovery, 4)}
            log.warning("promoted" if promoted else "promote: already a primary",
                        extra={"copy": copy.name, "epoch": epoch, **timings})
            doc: dict[str, Any] = {"promoted": promoted, **timings}
            if written is not None:
                doc.update(epoch=written.epoch, epochChanged=written.changed)
            return doc

    async def write_epoch(self, copy: Copy, epoch: int) -> EpochWrite:
        async with copy.lock:
            self._require_running(copy)
            return await self._write_epoch(copy, epoch)

    async def _write_epoch(self, copy: Copy, epoch: int) -> EpochWrite:
        try:
            written = await write_epoch(copy.server.dsn, epoch, copy.name)
        except NotPrimary as exc:
            raise PrimitiveRefused("not-a-primary", "That copy is a standby: it takes no writes.") from exc
        copy.claimed_epoch = max(copy.claimed_epoch, epoch)
        return written

    async def repoint(self, copy: Copy, primary: str) -> bool:
        """Follow `primary` (a database address as the map gives it)."""
        host, port = parse_address(self.config.physical(primary))
        async with copy.lock:
            self._require_running(copy)
            try:
                changed = await copy.server.repoint(host, port)
            except RuntimeError as exc:
                raise PrimitiveRefused("not-a-standby", "That copy is a primary: it follows no one.") from exc
            if changed:
                log.warning("repointed", extra={"copy": copy.name, "primary": primary})
            return changed

    async def set_sync(self, copy: Copy, standbys: list[str], mode: SyncMode) -> str:
        async with copy.lock:
            self._require_running(copy)
            value = await copy.server.set_sync_standbys(standbys, mode)
            log.warning("synchronous standby set", extra={"copy": copy.name, "value": value})
            return value

    async def rewind(self, copy: Copy, primary: str) -> RewindResult | None:
        primary = self.config.physical(primary)
        parse_address(primary)
        async with copy.lock:
            shard = self.shard_of(copy)
            if shard is not None and map_says_primary(shard, copy.config):
                raise PrimitiveRefused("map-primary", "The map names this copy primary: it is not rewound.")
            result = await self._restart_as_standby(copy, primary, force_rewind=True)
            await self._wait_ready(copy)
            return result

    async def stop_copy(self, copy: Copy, hold: float | None = None) -> float:
        """Stop the copy and keep it down while the map stays where it is now, for at most
        `hold` seconds (default `STOP_HOLD`, or `STOP_HOLD_IN_TRANSITION` when the shard
        is in a transition: a switchover's stop step). Returns the hold."""
        async with copy.lock:
            shard = self.shard_of(copy)
            transition = shard.transition if shard is not None else None
            if hold is None:
                hold = STOP_HOLD_IN_TRANSITION if transition is not None else STOP_HOLD
            copy.operator_stop = OperatorStop(time.monotonic() + hold,
                                              shard.epoch if shard is not None else None, transition)
            await asyncio.to_thread(copy.server.stop)
            await asyncio.to_thread(copy.server.wait_stopped)
            log.warning("stopped by the operator", extra={
                "copy": copy.name, "hold_seconds": hold, "in_transition": transition is not None})
            return hold

    async def start_copy(self, copy: Copy) -> None:
        async with copy.lock:
            copy.operator_stop = None
            copy.retry_at = 0.0
            if not copy.server.running():
                shard = self.shard_of(copy)
                if shard is None:
                    raise PrimitiveRefused("no-map", "No region map is loaded: the copy's role is unknown.")
                await self._start_in_map_role(copy, shard)
            await self._wait_ready(copy)

    async def _wait_ready(self, copy: Copy) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not await asyncio.to_thread(copy.server.accepting_connections):
            if not copy.server.running() or time.monotonic() > deadline:
                raise PrimitiveRefused("not-running", "The copy's server did not come up.")
            await asyncio.sleep(0.05)
