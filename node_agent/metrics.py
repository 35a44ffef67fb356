"""The node agent's metrics: each copy's Postgres as its host sees it, and replication.

Replication is measured here, not in the booking service: the agent owns the servers
(it knows a copy is down even when nothing can connect to it, and while its host's
booking service is stopped or restarting), it already reads their positions, and it
keeps its readings off the booking pools. Every `interval` seconds a `ReplicationProbe`
asks each running copy, over one connection of its own kept open between rounds:

- on every copy: `boxoffice_postgres_up{shard,copy}` (running and answering),
  `boxoffice_postgres_role{shard,copy,role}` (primary / standby: what the database says),
  `boxoffice_postgres_wal_position_bytes{shard,copy}` (a primary's current WAL position,
  a standby's replay position) and `boxoffice_postgres_epoch{shard,copy}` (the epoch row);
- on a primary, per standby the map names (`standby` is the standby's copy key), from
  `pg_stat_replication`: `boxoffice_replication_connected` (a WAL sender streams to it;
  0 when the standby is gone), `boxoffice_replication_sync` (in the synchronous set now),
  `boxoffice_replication_lag_bytes{kind}` (the primary's current position minus the
  standby's write / flush / replay position) and `boxoffice_replication_lag_seconds{kind}`
  (Postgres's write_lag / flush_lag / replay_lag: the time from a local flush to the
  standby's confirmation, measured by Postgres; reset to 0 once the standby has caught up
  and the primary is idle, instead of the NULL Postgres shows then);
- on a standby: `boxoffice_replica_streaming` (its WAL receiver streams) and
  `boxoffice_replica_apply_lag_bytes` (received but not replayed yet).

Replication lag is never "time since the last replayed commit", which grows while the
primary is idle. Plus the agent's view of the map (`boxoffice_postgres_map_role`, which
copy the map names primary; `boxoffice_map_*`) and `boxoffice_postgres_restarts_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from prometheus_client.core import CounterMetricFamily, Metric

from common.metrics import MapChanges, gauge, map_families, register_collector, state_rows
from node_agent.epoch import READ_EPOCH
from node_agent.supervisor import DB_ERRORS, Copy, Supervisor, map_says_primary

log = logging.getLogger("boxoffice.node_agent.metrics")

INTERVAL = 1.0
TIMEOUT = 1.0
LAG_KINDS = ("write", "flush", "replay")

COPY_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
             ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn)::float8 AS position,
       (pg_last_wal_receive_lsn() - pg_last_wal_replay_lsn())::float8 AS apply_lag,
       coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false) AS streaming
"""
STANDBYS_SQL = """
SELECT application_name, state, sync_state,
       (pg_current_wal_lsn() - write_lsn)::float8 AS write_bytes,
       (pg_current_wal_lsn() - flush_lsn)::float8 AS flush_bytes,
       (pg_current_wal_lsn() - replay_lsn)::float8 AS replay_bytes,
       extract(epoch FROM write_lag)::float8 AS write_seconds,
       extract(epoch FROM flush_lag)::float8 AS flush_seconds,
       extract(epoch FROM replay_lag)::float8 AS replay_seconds
FROM pg_stat_replication
"""


def standby_name(shard: str, copy: str) -> str:
    """The application_name a standby streams under (deploy.cluster.server_name)."""
    return f"{shard}-{copy.replace('/', '-')}"


@dataclass
class Reading:
    """One round's answer from one copy (None fields: not known this round)."""

    up: bool = False
    in_recovery: bool | None = None
    position: float | None = None
    apply_lag: float | None = None
    streaming: bool | None = None
    epoch: int | None = None
    standbys: dict[str, dict[str, Any]] = field(default_factory=dict)  # copy key -> row


def lag_seconds(row: dict[str, Any], kind: str) -> float | None:
    """Postgres's lag time, or 0 when the standby holds everything (Postgres shows NULL
    once an idle primary's standby has caught up); None when unknown."""
    seconds = row.get(f"{kind}_seconds")
    if seconds is not None:
        return float(seconds)
    return 0.0 if row.get(f"{kind}_bytes") == 0 else None


class ReplicationProbe:
    """Reads every copy of one agent every `interval` seconds; `families()` for scrapes."""

    def __init__(self, supervisor: Supervisor, interval: float = INTERVAL) -> None:
        self.supervisor = supervisor
        self.interval = interval
        self.readings: dict[str, Reading] = {}
        self._conns: dict[str, asyncpg.Connection] = {}
        self._task: asyncio.Task[None] | None = None
        self._changes: MapChanges | None = None
        self._unregister = lambda: None

    async def start(self) -> None:
        self._changes = MapChanges(self.supervisor.watcher)
        self._unregister = register_collector(self.families)
        self._task = asyncio.create_task(self._run(), name="node-agent-metrics")

    async def stop(self) -> None:
        self._unregister()
        if self._changes is not None:
            self._changes.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for shard in list(self._conns):
            await self._close(shard)

    async def _run(self) -> None:
        while True:
            copies = list(self.supervisor.copies.values())
            results = await asyncio.gather(*(self.read(c) for c in copies), return_exceptions=True)
            for copy, result in zip(copies, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning("metrics probe failed", extra={"copy": copy.name, "error": repr(result)})
                    result = Reading()
                self.readings[copy.config.shard] = result
            await asyncio.sleep(self.interval)  # the probe's period

    async def read(self, copy: Copy) -> Reading:
        shard = copy.config.shard
        if not copy.server.running():
            await self._close(shard)
            return Reading()
        try:
            conn = self._conns.get(shard)
            if conn is None or conn.is_closed():
                conn = self._conns[shard] = await asyncpg.connect(
                    copy.server.dsn, timeout=TIMEOUT,
                    server_settings={"application_name": "boxoffice-node-agent-metrics"})
            row = await conn.fetchrow(COPY_SQL, timeout=TIMEOUT)
            assert row is not None
            reading = Reading(True, bool(row["in_recovery"]), row["position"], row["apply_lag"],
                              bool(row["streaming"]))
            with contextlib.suppress(asyncpg.UndefinedTableError):
                epoch = await conn.fetchval(READ_EPOCH, timeout=TIMEOUT)
                reading.epoch = None if epoch is None else int(epoch)
            if not reading.in_recovery:
                names = self._standby_names(shard)
                for r in await conn.fetch(STANDBYS_SQL, timeout=TIMEOUT):
                    key = names.get(r["application_name"])
                    if key is not None:
                        reading.standbys[key] = dict(r)
            return reading
        except DB_ERRORS:
            await self._close(shard)
            return Reading()

    def _standby_names(self, shard: str) -> dict[str, str]:
        """application_name -> copy key, for the shard's copies in the map."""
        current = self.supervisor.watcher.current
        record = current.shards.get(shard) if current is not None else None
        return {standby_name(shard, k): k for k in (record.members if record is not None else ())}

    async def _close(self, shard: str) -> None:
        conn = self._conns.pop(shard, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), TIMEOUT)

    def families(self) -> Iterable[Metric]:
        sup = self.supervisor
        up, roles, position, epoch, streaming, apply_lag, map_role = [], [], [], [], [], [], []
        connected, sync, lag_bytes, lag_s = [], [], [], []
        restarts = CounterMetricFamily("boxoffice_postgres_restarts",
                                       "Times the agent started a copy's server again",
                                       labels=["shard", "copy"])
        for shard_name, copy in sup.copies.items():
            labels = [shard_name, copy.config.member]
            reading = self.readings.get(shard_name, Reading())
            up.append((labels, 1.0 if reading.up else 0.0))
            restarts.add_metric(labels, copy.restarts)
            record = sup.shard_of(copy)
            if record is not None:
                map_role.extend(state_rows(
                    labels, ("primary", "standby"),
                    "primary" if map_says_primary(record, copy.config) else "standby"))
            if not reading.up:
                continue
            roles.extend(state_rows(labels, ("primary", "standby"),
                                    "standby" if reading.in_recovery else "primary"))
            position.append((labels, reading.position))
            epoch.append((labels, reading.epoch))
            if reading.in_recovery:
                streaming.append((labels, 1.0 if reading.streaming else 0.0))
                apply_lag.append((labels, reading.apply_lag))
                continue
            expected = [k for k in (record.members if record is not None else ())
                        if k != copy.config.member]
            for key in sorted(set(expected) | set(reading.standbys)):
                row = reading.standbys.get(key)
                slabels = [shard_name, key]
                connected.append((slabels, 1.0 if row and row["state"] == "streaming" else 0.0))
                if row is None:
                    continue
                sync.append((slabels, 1.0 if row["sync_state"] in ("sync", "quorum") else 0.0))
                for kind in LAG_KINDS:
                    lag_bytes.append(([*slabels, kind], row[f"{kind}_bytes"]))
                    lag_s.append(([*slabels, kind], lag_seconds(row, kind)))
        yield gauge("boxoffice_postgres_up", "1 when the copy's server runs and answers",
                    ["shard", "copy"], up)
        yield gauge("boxoffice_postgres_role", "What the copy's database says it is: 1 for it",
                    ["shard", "copy", "role"], roles)
        yield gauge("boxoffice_postgres_map_role",
                    "What the region map says the copy is, as its agent sees the map",
                    ["shard", "copy", "role"], map_role)
        yield gauge("boxoffice_postgres_wal_position_bytes",
                    "A primary's current WAL position, a standby's replay position",
                    ["shard", "copy"], position)
        yield gauge("boxoffice_postgres_epoch", "The epoch row in the copy's database",
                    ["shard", "copy"], epoch)
        yield gauge("boxoffice_replica_streaming", "1 when the standby's WAL receiver streams",
                    ["shard", "copy"], streaming)
        yield gauge("boxoffice_replica_apply_lag_bytes",
                    "WAL the standby received but has not replayed yet", ["shard", "copy"],
                    apply_lag)
        yield gauge("boxoffice_replication_connected",
                    "On a primary: 1 when a WAL sender streams to the standby the map names",
                    ["shard", "standby"], connected)
        yield gauge("boxoffice_replication_sync",
                    "On a primary: 1 when the standby is in the synchronous set now",
                    ["shard", "standby"], sync)
        yield gauge("boxoffice_replication_lag_bytes",
                    "On a primary: its current WAL position minus the standby's write, flush "
                    "or replay position", ["shard", "standby", "kind"], lag_bytes)
        yield gauge("boxoffice_replication_lag_seconds",
                    "On a primary: Postgres's write, flush or replay lag of the standby (0 "
                    "once it holds everything)", ["shard", "standby", "kind"], lag_s)
        yield restarts
        current = sup.watcher.current
        yield gauge("boxoffice_map_shard_epoch", "Each shard's epoch in the region map in use",
                    ["process", "shard"],
                    [(["node_agent", s.name], s.epoch) for s in
                     (current.shards.values() if current is not None else ())])
        changes = self._changes
        yield from map_families("node_agent", sup.watcher, lambda: changes.at if changes else None)
