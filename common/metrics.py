"""Prometheus metrics shared by every process: per-route latency and errors."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

REQUEST_SECONDS = Histogram(
    "boxoffice_http_request_seconds",
    "HTTP request latency by route",
    ["process", "method", "route", "status_class"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
REQUEST_ERRORS = Counter(
    "boxoffice_http_errors_total", "HTTP responses with status >= 500", ["process", "route"]
)


def metrics_middleware(process: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    children: dict[tuple[str, str, int], Any] = {}

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
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
