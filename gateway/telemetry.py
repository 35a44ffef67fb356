"""The gateway's own metrics: booking outcomes, breakers, the map and the health view.

- `boxoffice_gateway_bookings_total{kind}`: every answer to `POST /api/bookings`, by
  what it meant for the client (`booking_kind`): created, replayed, sold-out,
  not-found, invalid, conflict, rate-limited, overloaded, in-transition, unavailable,
  timeout, error. A fixed set: no event, booking or client in any label.
- `boxoffice_gateway_breaker_state{upstream,shard,copy,state}`: each shard copy's
  circuit breaker (closed, open, half-open: its cool-down is over and the next call
  probes), read from the breakers at scrape time; `..._breaker_failures` the
  consecutive failures counted against it.
- `boxoffice_gateway_shard_primary_healthy{shard}`: 1 when the copy the map names
  primary passes its Consul check and its breaker is closed (this gateway can send it
  writes); `boxoffice_map_shard_epoch{process,shard}` the epoch this gateway routes by.
- `boxoffice_gateway_failing_copies`: registered booking-service instances whose
  Consul checks fail, in this gateway's health view.
- The map in use (`common.metrics.map_families`): index, age, Consul reachable.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import Counter
from prometheus_client.core import Metric

from common.metrics import (
    MapChanges,
    gauge,
    map_families,
    problem_type,
    register_collector,
    state_rows,
)

if TYPE_CHECKING:
    from gateway.app import Gateway

BOOKINGS = Counter("boxoffice_gateway_bookings_total",
                   "Answers to POST /api/bookings by what they meant for the client", ["kind"])
BREAKER_STATES = ("closed", "open", "half-open")
BOOKING_PATH = "/api/bookings"

# Problem types with a kind of their own (the rest go by status).
_KIND_BY_TYPE = {
    "insufficient-inventory": "sold-out",
    "client-reference-reused": "conflict",
    "conflict": "conflict",
    "rate-limited": "rate-limited",
    "overloaded": "overloaded",
    "shard-in-transition": "in-transition",
    "deadline-exceeded": "timeout",
}


def booking_kind(status: int, problem_type: str = "") -> str:
    """What an answer to a booking meant: its kind, from the status and problem type."""
    if status == 201:
        return "created"
    if status == 200:
        return "replayed"
    if problem_type in _KIND_BY_TYPE:
        return _KIND_BY_TYPE[problem_type]
    if status == 404:
        return "not-found"
    if status == 409:
        return "conflict"
    if 400 <= status < 500:
        return "invalid"
    if status == 503:
        return "unavailable"
    if status == 504:
        return "timeout"
    return "error"


async def _count_booking(request: web.Request, response: web.StreamResponse) -> None:
    if request.method == "POST" and request.path == BOOKING_PATH:
        kind = booking_kind(response.status,
                            problem_type(response) if response.status >= 400 else "")
        BOOKINGS.labels(kind).inc()


def gateway_families(gateway: Gateway, changes: MapChanges) -> Iterable[Metric]:
    """The metrics read from a gateway at scrape time."""
    watcher, upstreams = gateway.watcher, gateway.upstreams
    current = watcher.current
    copy_of: dict[str, tuple[str, str]] = {}
    if current is not None:
        for shard in current.shards.values():
            for key, member in shard.members.items():
                copy_of[member.service_url] = (shard.name, key)
    now = time.monotonic()
    states, failures = [], []
    for upstream, breaker in list(upstreams.breakers.items()):
        shard_name, copy = copy_of.get(upstream, ("", ""))
        if breaker.opened_at is None:
            state = "closed"
        else:
            state = "open" if now - breaker.opened_at < breaker.cooldown else "half-open"
        states += state_rows([upstream, shard_name, copy], BREAKER_STATES, state)
        failures.append(([upstream, shard_name, copy], float(breaker.failures)))
    labels = ["upstream", "shard", "copy"]
    yield gauge("boxoffice_gateway_breaker_state",
                "Circuit breaker of each shard copy: 1 for its state (closed, open, half-open)",
                [*labels, "state"], states)
    yield gauge("boxoffice_gateway_breaker_failures",
                "Consecutive failures counted against each shard copy's breaker", labels, failures)
    shards = list(current.shards.values()) if current is not None else []
    healthy = []
    for shard in shards:
        primary = shard.members.get(shard.primary_copy)
        ok = primary is not None and not gateway._failing(primary) and not (
            upstreams.breakers.get(primary.service_url) is not None
            and upstreams.breakers[primary.service_url].open)
        healthy.append(([shard.name], 1.0 if ok else 0.0))
    yield gauge("boxoffice_gateway_shard_primary_healthy",
                "1 when the copy the map names primary passes its Consul check and its breaker "
                "is closed", ["shard"], healthy)
    yield gauge("boxoffice_map_shard_epoch", "Each shard's epoch in the region map in use",
                ["process", "shard"], [(["gateway", s.name], s.epoch) for s in shards])
    health = gateway.service_health
    failing = None if health is None else sum(not i.passing for i in health.instances)
    yield gauge("boxoffice_gateway_failing_copies",
                "Booking-service instances whose Consul checks fail, in this gateway's view",
                [], [([], failing)])
    yield from map_families("gateway", watcher, lambda: changes.at)


def install(app: web.Application, gateway: Gateway) -> None:
    """Count booking outcomes and collect the gateway's state while `app` runs."""
    app.on_response_prepare.append(_count_booking)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        changes = MapChanges(gateway.watcher)
        unregister = register_collector(lambda: gateway_families(gateway, changes))
        yield
        unregister()
        changes.close()

    app.cleanup_ctx.append(lifecycle)
