"""The booking service's own metrics, per shard copy it serves (labels `shard`, `copy`).

Read at scrape time from what the service holds anyway:
- `boxoffice_shard_role{shard,copy,role}`: the copy's derived role (shard_service/roles.py:
  primary, replica, fenced, unknown), 1 for the current one; `boxoffice_shard_epoch
  {shard,copy,source}` the map's epoch and the database's epoch row it was derived from.
- `boxoffice_pool_connections{shard,copy,state}` (idle, in-use) and
  `boxoffice_pool_max_connections{shard,copy}`: the asyncpg pool; `boxoffice_pool_wait_seconds
  {shard}` (a histogram, observed where a connection is taken) how long requests waited
  for one.
- The map in use (`common.metrics.map_families`, process `shard_service`).

Counted as answers leave: `boxoffice_fencing_refusals_total{shard,kind}`, writes this copy
refused for its role or epoch (`fenced`, `stale-epoch`, `not-primary`): a gateway whose
map is behind, or a stale primary doing its job of refusing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import Counter, Histogram
from prometheus_client.core import Metric

from common.metrics import (
    MapChanges,
    gauge,
    map_families,
    problem_type,
    register_collector,
    state_rows,
)
from shard_service.roles import Role

if TYPE_CHECKING:
    from shard_service.app import ShardHandlers

POOL_WAIT_SECONDS = Histogram(
    "boxoffice_pool_wait_seconds", "Time a request waited for a pooled database connection",
    ["shard"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
FENCING_REFUSALS = Counter(
    "boxoffice_fencing_refusals_total",
    "Writes refused for this copy's role or the epoch they carried", ["shard", "kind"])
FENCING_KINDS = frozenset({"fenced", "stale-epoch", "not-primary"})
ROLES = tuple(str(r) for r in Role)


def service_families(handlers: Sequence[ShardHandlers], changes: MapChanges) -> Iterable[Metric]:
    roles, epochs, connections, maximum = [], [], [], []
    for h in handlers:
        labels = [h.config.name, h.config.member]
        view = h.roles.view
        roles += state_rows(labels, ROLES, str(view.role))
        epochs.append(([*labels, "map"], view.map_epoch))
        epochs.append(([*labels, "database"],
                       view.database.epoch if view.database is not None else None))
        pool = h.pool
        if pool is not None:
            size, idle = pool.get_size(), pool.get_idle_size()
            connections += [([*labels, "idle"], idle), ([*labels, "in-use"], size - idle)]
            maximum.append((labels, pool.get_max_size()))
    yield gauge("boxoffice_shard_role", "The copy's derived role: 1 for the current one",
                ["shard", "copy", "role"], roles)
    yield gauge("boxoffice_shard_epoch", "The map's epoch for the shard and the copy's epoch row",
                ["shard", "copy", "source"], epochs)
    yield gauge("boxoffice_pool_connections", "Pooled database connections by state",
                ["shard", "copy", "state"], connections)
    yield gauge("boxoffice_pool_max_connections", "The pool's maximum size", ["shard", "copy"],
                maximum)
    if handlers:
        yield from map_families("shard_service", handlers[0].roles.watcher, lambda: changes.at)


def _shard_of(path: str, names: Sequence[str]) -> str | None:
    """The shard a request was for: `/shards/<name>/...`, or the only one served."""
    if path.startswith("/shards/"):
        name = path.split("/", 3)[2]
        return name if name in names else None
    return names[0] if len(names) == 1 else None


def install(app: web.Application, handlers: Sequence[ShardHandlers]) -> None:
    """Count fencing refusals and collect the copies' state while `app` runs."""
    names = [h.config.name for h in handlers]

    async def count_refusal(request: web.Request, response: web.StreamResponse) -> None:
        if response.status != 503 or request.method not in ("POST", "PUT", "DELETE"):
            return
        kind = problem_type(response)
        shard = _shard_of(request.path, names)
        if kind in FENCING_KINDS and shard is not None:
            FENCING_REFUSALS.labels(shard, kind).inc()

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        changes = MapChanges(handlers[0].roles.watcher)
        unregister = register_collector(lambda: service_families(handlers, changes))
        yield
        unregister()
        changes.close()

    app.on_response_prepare.append(count_refusal)
    app.cleanup_ctx.append(lifecycle)
