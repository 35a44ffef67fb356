"""Prometheus metrics shared by every process: per-route latency and errors, and the
helpers for metrics read from live state at scrape time (breakers, pools, roles, the
region map in use). Every process serves them on its internal metrics listener; the
names and the alerts built on them are in docs/observability.md."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler, Middleware

    from region_map import MapWatcher

log = logging.getLogger("boxoffice.metrics")

REQUEST_SECONDS = Histogram(
    "boxoffice_http_request_seconds",
    "HTTP request latency by route",
    ["process", "method", "route", "status_class"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
REQUEST_ERRORS = Counter(
    "boxoffice_http_errors_total", "HTTP responses with status >= 500", ["process", "route"]
)


def metrics_middleware(process: str) -> Middleware:
    children: dict[tuple[str, str, int], Histogram] = {}

    @web.middleware
    async def middleware(
        request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            info = request.match_info.route.resource
            route = info.canonical if info is not None else "unmatched"
            key = (request.method, route, status // 100)
            histogram = children.get(key)
            if histogram is None:  # label lookups take a lock: once per combination
                histogram = children[key] = REQUEST_SECONDS.labels(
                    process, request.method, route, f"{status // 100}xx")
            histogram.observe(time.perf_counter() - started)
            if status >= 500:
                REQUEST_ERRORS.labels(process, route).inc()

    return middleware


async def metrics_handler(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- metrics read at scrape time -------------------------------------------------------
# State that already lives in memory (a breaker, the map in use, a pool, a derived role)
# is read when Prometheus scrapes, never copied into gauges: nothing goes stale, and a
# label set that disappears (a breaker forgotten, a role left) disappears from /metrics.

Produce = Callable[[], Iterable[Metric]]


class CallbackCollector(Collector):
    """A collector that asks `produce` for its metric families at every scrape. A
    failing `produce` is logged and yields nothing (the rest of /metrics is served)."""

    def __init__(self, produce: Produce) -> None:
        self.produce = produce

    def describe(self) -> list[Metric]:
        return []  # not checked for duplicates: several apps in one test process are fine

    def collect(self) -> Iterator[Metric]:
        try:
            yield from list(self.produce())
        except Exception:
            log.exception("metrics collector failed")


def register_collector(produce: Produce, registry: CollectorRegistry = REGISTRY) -> Callable[[], None]:
    """Register `produce` for every scrape; returns the function that unregisters it."""
    collector = CallbackCollector(produce)
    registry.register(collector)
    return lambda: registry.unregister(collector)


def gauge(name: str, documentation: str, labels: Sequence[str],
          rows: Iterable[tuple[Sequence[str], float | None]]) -> GaugeMetricFamily:
    """A gauge family from (label values, value) rows; a None value is left out."""
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    for values, value in rows:
        if value is not None:
            family.add_metric([str(v) for v in values], float(value))
    return family


def state_rows(label_values: Sequence[str], states: Sequence[str],
               current: str | None) -> list[tuple[list[str], float]]:
    """An enum as a gauge: one row per possible state, 1 for the current one, 0 for the
    others (so `== 1` selects it and a change shows as two series flipping)."""
    return [([*label_values, s], 1.0 if s == current else 0.0) for s in states]


def map_families(process: str, watcher: MapWatcher, changed_at: Callable[[], float | None]
                 ) -> list[Metric]:
    """The region map a process routes by: its Consul index, seconds since it last
    changed, and whether the last query to Consul succeeded."""
    current = watcher.current
    changed = changed_at()
    return [
        gauge("boxoffice_map_index", "Consul index of the region map in use (absent: none loaded)",
              ["process"], [([process], current.index if current is not None else None)]),
        gauge("boxoffice_map_age_seconds", "Seconds since the region map in use last changed",
              ["process"], [([process], time.time() - changed if changed is not None else None)]),
        gauge("boxoffice_map_store_reachable",
              "1 when the last query to Consul for the region map succeeded", ["process"],
              [([process], 1.0 if getattr(watcher, "healthy", False) else 0.0)]),
    ]


class MapChanges:
    """Remembers when a watcher's map last changed (wall clock), for `map_families`."""

    def __init__(self, watcher: MapWatcher) -> None:
        self.at: float | None = time.time() if watcher.current is not None else None
        add_listener = getattr(watcher, "add_listener", None)  # test doubles may not have one
        self._unlisten = add_listener(self._changed) if add_listener else (lambda: None)

    def _changed(self, _: object) -> None:
        self.at = time.time()

    def close(self) -> None:
        self._unlisten()


def problem_type(response: web.StreamResponse) -> str:
    """The last segment of a problem document's `type` ("" when it is not one)."""
    body = getattr(response, "body", None)
    if not isinstance(body, bytes | bytearray) or len(body) > 16384:
        return ""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    return str(doc.get("type", "")).rsplit("/", 1)[-1] if isinstance(doc, dict) else ""
