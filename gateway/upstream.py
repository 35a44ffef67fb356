"""Calls from the gateway to booking services: timeouts, breakers, request ids.

The gateway never opens a database connection; it reaches every shard through
the booking service beside that shard's database, as vtgate reaches MySQL
only through vttablets.

Every call is signed as the gateway (common/internal_auth.py: the process's own key,
`BOXOFFICE_INTERNAL_KIND=gateway` and `BOXOFFICE_INTERNAL_KEY`): a booking service
accepts its booking and read routes from gateways (and the operator) only. A gateway
started without a key sends unsigned calls, which only a service without keys serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from prometheus_client import Counter
from yarl import URL

from common.internal_auth import Signer, signed_body
from common.logs import REQUEST_ID_HEADER, request_id_var

UPSTREAM_FAILURES = Counter(
    "boxoffice_upstream_failures_total",
    "Calls to a booking service that got no answer: unreachable or timed out, or not "
    "sent because its circuit breaker is open",
    ["upstream", "reason"],
)


@dataclass
class UpstreamResponse:
    status: int
    body: bytes
    headers: dict[str, str]
    content_type: str


class UpstreamUnavailable(Exception):
    """The booking service could not be reached, timed out, or its breaker is open."""


# 503 problem types by which a booking service says its own dependency is unhealthy.
# Only these (and no answer at all) count against a breaker: a 500, a 4xx, or a
# 503 about one request (a lagging replica, a deadline, shedding) says nothing
# about the health of the copy, and one client's input must never open it.
UNHEALTHY_PROBLEM_TYPES = ("/database-unavailable", "/not-ready")


def signals_unhealthy(status: int, body: bytes) -> bool:
    """Does this answer say the copy itself is unhealthy (its database is unreachable)?"""
    if status != 503:
        return False
    head = body[:512]
    return any(t.encode() in head for t in UNHEALTHY_PROBLEM_TYPES)


class CircuitBreaker:
    """Per-shard-copy breaker: opens after `threshold` consecutive failures; once
    `cooldown` has passed it lets a single probe through (half-open) and stays
    open for everyone else until that probe succeeds."""

    def __init__(
        self, threshold: int = 5, cooldown: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        now = self.clock()
        if now - self.opened_at < self.cooldown:
            return False
        self.opened_at = now  # this caller is the probe; the rest wait another cool-down
        return True

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.opened_at = self.clock()

    @property
    def open(self) -> bool:
        return self.opened_at is not None


class Upstreams:
    """One HTTP client for all booking services, with the simulated network applied."""

    def __init__(
        self,
        address_rewrites: dict[str, str] | None = None,
        *,
        connect_timeout: float = 1.0,
        read_timeout: float = 5.0,
        signer: Signer | None = None,
    ) -> None:
        self.address_rewrites = address_rewrites or {}
        self.signer = signer if signer is not None else Signer.from_environment()
        self.timeout = aiohttp.ClientTimeout(
            total=read_timeout, connect=connect_timeout, sock_connect=connect_timeout
        )
        self.breakers: dict[str, CircuitBreaker] = {}
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=256, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=self.timeout, auto_decompress=False
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def physical_url(self, url: str) -> str:
        """Apply the simulated network: cross-region addresses go through delay proxies."""
        parts = urlsplit(url)
        netloc = self.address_rewrites.get(parts.netloc, parts.netloc)
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def breaker(self, upstream: str) -> CircuitBreaker:
        """The breaker of one shard copy, by its booking service base URL
        (`http://host:port/shards/<shard>`): a process serving several copies has
        one breaker per copy, so one copy's failing database opens only its own."""
        if upstream not in self.breakers:
            self.breakers[upstream] = CircuitBreaker()
        return self.breakers[upstream]

    async def request(
        self,
        method: str,
        base_url: str,
        path: str,
        *,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> UpstreamResponse:
        assert self.session is not None, "Upstreams.start() first"
        upstream = base_url
        breaker = self.breaker(upstream)
        if not breaker.allow():
            UPSTREAM_FAILURES.labels(upstream, "breaker-open").inc()
            raise UpstreamUnavailable(f"circuit open for {base_url}")
        send_headers = dict(headers or {})
        rid = request_id_var.get()
        if rid:
            send_headers[REQUEST_ID_HEADER] = rid
        url = URL(self.physical_url(base_url.rstrip("/") + path))
        if params:
            url = url.update_query(params)
        data = signed_body(json_body)
        if data:
            send_headers["Content-Type"] = "application/json"
        if self.signer is not None:
            send_headers.update(self.signer.sign(method, url, data))
        try:
            async with self.session.request(
                method,
                url,
                data=data or None,
                headers=send_headers,
                timeout=aiohttp.ClientTimeout(total=timeout) if timeout else None,
            ) as resp:
                body = await resp.read()
                result = UpstreamResponse(
                    resp.status, body, dict(resp.headers), resp.content_type
                )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            breaker.failure()
            UPSTREAM_FAILURES.labels(upstream, "unreachable").inc()
            raise UpstreamUnavailable(f"{method} {base_url}{path}: {type(exc).__name__}") from exc
        if signals_unhealthy(result.status, result.body):
            breaker.failure()
        elif result.status < 500 or result.status == 503:
            breaker.success()  # it answered for itself: healthy, whatever the request asked
        # (another 5xx is a defect triggered by one request: it neither opens nor closes)
        return result
