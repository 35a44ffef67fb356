"""Overload protection: per-client booking rate limits and load shedding.

Three mechanisms, two aiohttp middlewares:

- `RateLimiter`: a token bucket per client (`rate` tokens a second, at most `burst`
  saved up). A booking or cancel that finds its client's bucket empty is answered
  429 `rate-limited` with `Retry-After` (whole seconds, at least 1) and never reaches
  a booking service, so one client cannot buy a whole tier in a burst. Memory is
  bounded: buckets are kept in least-recently-used order, a bucket idle long enough
  to have refilled is dropped (it is the same as a new one), and beyond `max_keys`
  the least recently used bucket is dropped.

- `AdmissionController`: a bounded number of requests in flight per route class
  ("read", "booking") and a bounded wait queue in front of it. A request waits for a
  slot at most its class's queue-time budget; one that finds the queue full, or whose
  budget runs out, is shed: 503 `overloaded` with `Retry-After`, answered before the
  handler reads the body or calls anything. Reads are shed before bookings: a read is
  shed at once while any booking waits for a slot (and reads already waiting are shed
  when a booking starts to wait), and reads get the smaller budget. So under overload
  the requests that are admitted keep their latency, instead of every request
  waiting in an unbounded queue until the callers' timeouts fire and trip breakers.

- `LoopLagMonitor`: the in-flight limits protect the dependencies, but on a CPU-bound
  machine they are never reached: the delay builds up *before* the middleware runs,
  in the event loop's ready queue and the kernel's socket buffers, where no counter
  sees it. What does grow is the event loop's lag: how late a timer fires. One small
  task per process sleeps `interval` (10 ms) and records how late it woke; the lag
  is the *minimum* of those samples over the last `window` (100 ms; the newest sample
  always counts). As in CoDel, the minimum ignores a single slow step (a burst, a GC
  pause) and rises only when the loop was late for a whole window: a standing queue,
  not a passing one. While the lag is above a class's target (`read_lag_ms`,
  `booking_lag_ms`; reads lower), a new request of that class is shed at once, before
  it takes any work; as soon as one wake-up in the window is on time again, requests
  are admitted again. Requests already admitted are never affected.

A request's own queueing delay would be the better signal, but aiohttp does not say
when a request's bytes arrived or its head was parsed (only private parser state
does), so the loop lag stands in for it: every request waiting for the loop waits
about that long at each step.

The client key is the connecting address (`request.remote`), an IPv6 address by its
/64 (one host usually holds a whole /64). `X-Forwarded-For` is never trusted: any
client can send it. A deployment behind a proxy would configure the proxy as a
trusted hop and take the address that proxy appended (the last entry it wrote),
never the first, client-supplied one. The product has no client API keys; a
deployment that adds them would key bookings by the key instead.

Everything here but the middlewares is plain logic with an injectable clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import Counter, Gauge

from common.problems import Problem

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler, Middleware

READ = "read"
BOOKING = "booking"

# Why a request was shed (the `reason` label of boxoffice_shed_total).
QUEUE_FULL = "queue-full"        # no slot and the class's queue is full (or it has none)
QUEUE_TIMEOUT = "queue-timeout"  # waited for a slot longer than the class's budget
PRIORITY = "priority"            # a more important class has requests waiting
LOOP_LAG = "loop-lag"            # the event loop's lag is above the class's target
SHED_REASONS = (QUEUE_FULL, QUEUE_TIMEOUT, PRIORITY, LOOP_LAG)

SHED_TOTAL = Counter(
    "boxoffice_shed_total", "Requests shed (503 overloaded) before any work",
    ["process", "class", "reason"])
ADMITTED_TOTAL = Counter(
    "boxoffice_admitted_total", "Requests admitted by load shedding", ["process", "class"])
RATE_LIMITED_TOTAL = Counter(
    "boxoffice_rate_limited_total", "Bookings and cancels refused by a client's rate limit (429)",
    ["process"])
IN_FLIGHT = Gauge(
    "boxoffice_admission_in_flight", "Admitted requests being served", ["process", "class"])
QUEUED = Gauge(
    "boxoffice_admission_queued", "Requests waiting for an admission slot (queue depth)",
    ["process", "class"])
LOOP_LAG_SECONDS = Gauge(
    "boxoffice_event_loop_lag_seconds",
    "How late the event loop runs a timer: the minimum over the last 100 ms", ["process"])

Clock = Callable[[], float]


# -- per-client rate limits ----------------------------------------------------------
class RateLimiter:
    """Token buckets keyed by client: `check(key)` spends a token, or says how long to wait."""

    def __init__(self, rate_per_second: float, burst: int, *, max_keys: int = 100_000,
                 clock: Clock = time.monotonic) -> None:
        if rate_per_second <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("a rate limiter needs rate > 0, burst >= 1 and max_keys >= 1")
        self.rate = rate_per_second
        self.burst = float(burst)
        self.max_keys = max_keys
        self.clock = clock
        self.refill_seconds = self.burst / self.rate  # an idle bucket is full again after this
        # key -> (tokens, when counted); least recently used first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, key: str) -> float | None:
        """None: allowed (one token spent). Otherwise the seconds until a token is back."""
        now = self.clock()
        self._forget_idle(now)
        held = self._buckets.pop(key, None)
        tokens = self.burst if held is None else min(self.burst, held[0] + (now - held[1]) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)  # most recently used: the end
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return None if allowed else (1.0 - tokens) / self.rate

    def _forget_idle(self, now: float, at_most: int = 2) -> None:
        """Drop a few least recently used buckets that have refilled: amortised, so the
        map shrinks back after a crowd has gone without a sweep over all of it."""
        for _ in range(at_most):
            oldest = next(iter(self._buckets.items()), None)
            if oldest is None or now - oldest[1][1] < self.refill_seconds:
                return
            del self._buckets[oldest[0]]


def client_key(remote: str | None) -> str:
    """The rate-limit key of a connecting address: IPv4 as is, IPv6 by its /64."""
    if not remote:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote  # a unix socket peer, say
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def retry_after_header(seconds: float) -> str:
    """`Retry-After` in whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


# -- load shedding -----------------------------------------------------------------
@dataclass(frozen=True)
class ClassLimits:
    """One route class: at most `max_in_flight` served at once (0: no limit), at most
    `max_queue` waiting, each for at most `queue_seconds`; none admitted while the event
    loop's lag is above `lag_target` seconds (0: no lag rule)."""

    max_in_flight: int
    queue_seconds: float
    max_queue: int = 1024
    lag_target: float = 0.0


@dataclass
class _ClassState:
    limits: ClassLimits
    in_flight: int = 0
    waiters: deque[asyncio.Future[bool]] = field(default_factory=deque)

    def waiting(self) -> int:
        return sum(1 for w in self.waiters if not w.done())


class Shed(Exception):
    """The request was not admitted: answer 503 overloaded."""

    def __init__(self, route_class: str, reason: str) -> None:
        super().__init__(f"{route_class} shed: {reason}")  # reason: one of SHED_REASONS
        self.route_class = route_class
        self.reason = reason


class AdmissionController:
    """Bounded in-flight requests per route class, a bounded queue, a queue-time budget.

    `async with controller.admit("read"): ...` either runs the block holding a slot or
    raises `Shed`. A freed slot goes straight to the longest-waiting request of its
    class (first come, first served). `priority` lists the classes from the most
    important: a class is shed at once while a more important one has requests waiting.
    `lag` gives the event loop's current lag in seconds (a `LoopLagMonitor`'s `lag`):
    a class with a `lag_target` is shed at once while the lag is above it.
    """

    def __init__(self, limits: dict[str, ClassLimits], *, priority: tuple[str, ...] = (BOOKING, READ),
                 process: str = "", lag: Callable[[], float] | None = None) -> None:
        self.classes = {name: _ClassState(lim) for name, lim in limits.items()}
        self.lag = lag
        self.priority = [name for name in priority if name in self.classes]
        self.process = process
        self.shed_counts: dict[str, int] = dict.fromkeys(self.classes, 0)
        self.admitted_counts: dict[str, int] = dict.fromkeys(self.classes, 0)
        self.shed_reasons: dict[tuple[str, str], int] = {}
        # Metric children looked up once (a label lookup takes a lock).
        self._metrics = {
            name: (ADMITTED_TOTAL.labels(process, name),
                   IN_FLIGHT.labels(process, name), QUEUED.labels(process, name))
            for name in self.classes
        }
        self._shed_metrics = {(name, reason): SHED_TOTAL.labels(process, name, reason)
                              for name in self.classes for reason in SHED_REASONS}

    def in_flight(self, route_class: str) -> int:
        return self.classes[route_class].in_flight

    def queued(self, route_class: str) -> int:
        return self.classes[route_class].waiting()

    @contextlib.asynccontextmanager
    async def admit(self, route_class: str) -> AsyncIterator[None]:
        await self._acquire(route_class)
        try:
            yield
        finally:
            self._release(route_class)

    def _more_important_waiting(self, route_class: str) -> bool:
        if route_class not in self.priority:
            return False
        above = self.priority[: self.priority.index(route_class)]
        return any(self.classes[name].waiting() for name in above)

    def lagging(self, route_class: str) -> bool:
        """Is the event loop's lag above this class's target (so the class is shed)?"""
        target = self.classes[route_class].limits.lag_target
        return target > 0 and self.lag is not None and self.lag() > target

    def _shed(self, route_class: str, reason: str) -> Shed:
        self.shed_counts[route_class] += 1
        key = (route_class, reason)
        self.shed_reasons[key] = self.shed_reasons.get(key, 0) + 1
        self._shed_metrics[key].inc()
        return Shed(route_class, reason)

    def _admitted(self, route_class: str) -> None:
        self.admitted_counts[route_class] += 1
        self._metrics[route_class][0].inc()
        self._publish(route_class)

    def _publish(self, route_class: str) -> None:
        state = self.classes[route_class]
        _, in_flight, queued = self._metrics[route_class]
        in_flight.set(state.in_flight)
        queued.set(state.waiting())

    async def _acquire(self, route_class: str) -> None:
        state = self.classes[route_class]
        limits = state.limits
        if self.lagging(route_class):
            raise self._shed(route_class, LOOP_LAG)
        if limits.max_in_flight <= 0:  # no limit for this class
            state.in_flight += 1
            self._admitted(route_class)
            return
        if self._more_important_waiting(route_class):
            raise self._shed(route_class, PRIORITY)
        if state.in_flight < limits.max_in_flight and not state.waiting():
            state.in_flight += 1
            self._admitted(route_class)
            return
        if state.waiting() >= limits.max_queue or limits.queue_seconds <= 0:
            raise self._shed(route_class, QUEUE_FULL)
        self._shed_less_important_waiters(route_class)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        state.waiters.append(waiter)
        timer = loop.call_later(limits.queue_seconds, _resolve, waiter, False)
        self._publish(route_class)
        try:
            granted = await waiter
        except BaseException:  # cancelled while waiting: give back a slot handed over meanwhile
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self._release(route_class)
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                state.waiters.remove(waiter)
            self._publish(route_class)
        if not granted:
            raise self._shed(route_class, QUEUE_TIMEOUT)
        self._admitted(route_class)  # the slot was handed over: in_flight already counts it

    def _shed_less_important_waiters(self, route_class: str) -> None:
        if route_class not in self.priority:
            return
        for name in self.priority[self.priority.index(route_class) + 1:]:
            for waiter in self.classes[name].waiters:
                _resolve(waiter, False)

    def _release(self, route_class: str) -> None:
        state = self.classes[route_class]
        while state.waiters:
            waiter = state.waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)  # the slot passes to it; in_flight stays
                self._publish(route_class)
                return
        state.in_flight -= 1
        self._publish(route_class)


def _resolve(waiter: asyncio.Future[bool], granted: bool) -> None:
    if not waiter.done():
        waiter.set_result(granted)


# -- event-loop lag ----------------------------------------------------------------
class LoopLagEstimator:
    """The minimum of lag samples over a sliding `window` (seconds), the newest sample
    always included. Plain logic: samples carry their own time.

    Kept as a monotonic deque (each sample is dropped once it is older than the window
    or once a later sample is no larger), so a sample costs O(1) amortised."""

    def __init__(self, window: float = 0.1) -> None:
        if window <= 0:
            raise ValueError("the window must be positive")
        self.window = window
        self._samples: deque[tuple[float, float]] = deque()  # (when, lag), lag increasing

    def record(self, when: float, lag: float) -> None:
        while self._samples and self._samples[-1][1] >= lag:
            self._samples.pop()
        self._samples.append((when, lag))
        while self._samples[0][0] <= when - self.window:
            self._samples.popleft()  # never the newest: its time is `when`

    def lag(self) -> float:
        """The windowed minimum; 0 before the first sample."""
        return self._samples[0][1] if self._samples else 0.0


class LoopLagMonitor:
    """One task per process that measures how late the event loop wakes a timer.

    Every `interval` seconds it sleeps and records `woke - due` in a
    `LoopLagEstimator`; `lag()` is the minimum over the last `window`. A request that
    waits for the loop waits at least this long at every step, so when the minimum over
    a whole window stays above a class's target the process is overloaded, whatever
    its in-flight counts say. Start it from the app's lifecycle (`Protection.lifecycle`).
    """

    def __init__(self, process: str = "", *, interval: float = 0.01, window: float = 0.1,
                 clock: Clock = time.monotonic) -> None:
        if interval <= 0:
            raise ValueError("the interval must be positive")
        self.interval = interval
        self.clock = clock
        self.estimator = LoopLagEstimator(window)
        self._gauge = LOOP_LAG_SECONDS.labels(process)
        self._task: asyncio.Task[None] | None = None

    def lag(self) -> float:
        return self.estimator.lag()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            due = self.clock() + self.interval
            await asyncio.sleep(self.interval)
            woke = self.clock()
            self.estimator.record(woke, max(0.0, woke - due))
            self._gauge.set(self.estimator.lag())


# -- settings ----------------------------------------------------------------------
@dataclass(frozen=True)
class ProtectionSettings:
    """Per-client booking rate limit and shedding limits; 0 switches a limit off."""

    booking_rate_per_second: float = 0.0
    booking_burst: int = 20
    max_in_flight_reads: int = 0
    max_in_flight_bookings: int = 0
    read_queue_ms: float = 50.0
    booking_queue_ms: float = 250.0
    max_queue: int = 1024
    read_lag_ms: float = 0.0
    booking_lag_ms: float = 0.0

    def admission_limits(self) -> dict[str, ClassLimits]:
        return {
            READ: ClassLimits(self.max_in_flight_reads, self.read_queue_ms / 1000, self.max_queue,
                              self.read_lag_ms / 1000),
            BOOKING: ClassLimits(self.max_in_flight_bookings, self.booking_queue_ms / 1000,
                                 self.max_queue, self.booking_lag_ms / 1000),
        }

    @property
    def watches_lag(self) -> bool:
        return self.read_lag_ms > 0 or self.booking_lag_ms > 0

    @property
    def sheds(self) -> bool:
        return self.max_in_flight_reads > 0 or self.max_in_flight_bookings > 0 or self.watches_lag


# Gateways: the limits `deploy/topology.yaml` starts from (per gateway process).
GATEWAY_DEFAULTS = ProtectionSettings(
    booking_rate_per_second=5.0, booking_burst=20, max_in_flight_reads=64,
    max_in_flight_bookings=64, read_queue_ms=50.0, booking_queue_ms=250.0,
    read_lag_ms=30.0, booking_lag_ms=100.0)
# Booking services: their callers are gateways, which limit first; this is the backstop
# that keeps a service's own queue (for its connection pool) bounded. Their lag targets
# are higher than the gateways': a gateway sheds before it sends anything, while a read
# a service sheds has already cost the gateway a call (and it tries another copy).
SERVICE_DEFAULTS = ProtectionSettings(
    max_in_flight_reads=128, max_in_flight_bookings=128, read_queue_ms=500.0,
    booking_queue_ms=1000.0, read_lag_ms=100.0, booking_lag_ms=250.0)


# -- aiohttp middlewares -------------------------------------------------------------
UNSHED_PATHS = frozenset({"/api/health", "/api/ready"})


def api_path(path: str) -> str:
    """The `/api/...` part of a path, without a booking service's `/shards/<name>` prefix."""
    if path.startswith("/shards/"):
        _, _, rest = path[len("/shards/"):].partition("/")
        return "/" + rest
    return path


def is_booking_write(method: str, path: str) -> bool:
    """`POST /api/bookings` and `POST /api/bookings/{id}/cancel`."""
    if method != "POST":
        return False
    if path == "/api/bookings":
        return True
    parts = path.split("/")
    return len(parts) == 5 and parts[1:3] == ["api", "bookings"] and parts[4] == "cancel"


def route_class(method: str, path: str) -> str | None:
    """The shedding class of a request; None for what is never shed (health, readiness,
    operator routes, the page, metrics)."""
    path = api_path(path)
    if not path.startswith("/api/") or path in UNSHED_PATHS:
        return None
    if is_booking_write(method, path):
        return BOOKING
    return READ if method in ("GET", "HEAD") else BOOKING


def rate_limit_middleware(limiter: RateLimiter, process: str) -> Middleware:
    """429 `rate-limited` for a client's booking or cancel beyond its bucket."""

    limited = RATE_LIMITED_TOTAL.labels(process)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_booking_write(request.method, api_path(request.path)):
            wait = limiter.check(client_key(request.remote))
            if wait is not None:
                limited.inc()
                raise Problem(429, "rate-limited",
                              "Too many bookings from this client; try again after Retry-After "
                              "seconds.", headers={"Retry-After": retry_after_header(wait)})
        return await handler(request)

    return middleware


def shedding_middleware(controller: AdmissionController) -> Middleware:
    """503 `overloaded` for a request that gets no slot in time; runs before the handler
    (so before the body is read)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        cls = route_class(request.method, request.path)
        if cls is None or cls not in controller.classes:
            return await handler(request)
        try:
            async with controller.admit(cls):
                return await handler(request)
        except Shed as shed:
            raise Problem(503, "overloaded",
                          "The service is overloaded; nothing was done. Try again after "
                          "Retry-After seconds.", headers={"Retry-After": "1"}) from shed

    return middleware


# -- per process -------------------------------------------------------------------
@dataclass
class Protection:
    """A process's protection: its middlewares, and the lag monitor they read. The
    monitor runs even when no class has a lag target (its gauge shows operators how
    late the loop runs either way; it costs one timer every 10 ms). Add `lifecycle` to
    the app's `cleanup_ctx` so the monitor runs while the app does."""

    middlewares: list[Middleware]
    monitor: LoopLagMonitor

    async def lifecycle(self, _: web.Application) -> AsyncIterator[None]:
        self.monitor.start()
        try:
            yield
        finally:
            await self.monitor.stop()


def build_protection(settings: ProtectionSettings, process: str, *,
                     clock: Clock = time.monotonic) -> Protection:
    """The middlewares for `settings`, rate limit first (cheapest, uses no slot), and
    the process's lag monitor. Install the middlewares after the request-id and problem
    middlewares."""
    middlewares: list[Middleware] = []
    if settings.booking_rate_per_second > 0:
        limiter = RateLimiter(settings.booking_rate_per_second, settings.booking_burst, clock=clock)
        middlewares.append(rate_limit_middleware(limiter, process))
    monitor = LoopLagMonitor(process)
    if settings.sheds:
        middlewares.append(shedding_middleware(AdmissionController(
            settings.admission_limits(), process=process, lag=monitor.lag)))
    return Protection(middlewares, monitor)


# -- command line ------------------------------------------------------------------
# (setting, flag, environment variable, type, help)
_FLAGS: tuple[tuple[str, str, str, type, str], ...] = (
    ("booking_rate_per_second", "--booking-rate", "BOXOFFICE_BOOKING_RATE", float,
     "bookings and cancels a second per client address (0: no limit)"),
    ("booking_burst", "--booking-burst", "BOXOFFICE_BOOKING_BURST", int,
     "bookings a client may send at once before its rate applies"),
    ("max_in_flight_reads", "--max-in-flight-reads", "BOXOFFICE_MAX_IN_FLIGHT_READS", int,
     "reads served at once before more wait or are shed (0: no limit)"),
    ("max_in_flight_bookings", "--max-in-flight-bookings", "BOXOFFICE_MAX_IN_FLIGHT_BOOKINGS", int,
     "bookings and cancels served at once before more wait or are shed (0: no limit)"),
    ("read_queue_ms", "--read-queue-ms", "BOXOFFICE_READ_QUEUE_MS", float,
     "how long a read may wait for a slot before it is shed"),
    ("booking_queue_ms", "--booking-queue-ms", "BOXOFFICE_BOOKING_QUEUE_MS", float,
     "how long a booking may wait for a slot before it is shed"),
    ("read_lag_ms", "--read-lag-ms", "BOXOFFICE_READ_LAG_MS", float,
     "shed reads while the event loop's lag (minimum over 100 ms) is above this (0: off)"),
    ("booking_lag_ms", "--booking-lag-ms", "BOXOFFICE_BOOKING_LAG_MS", float,
     "shed bookings and cancels while the event loop's lag is above this (0: off)"),
)


def add_protection_arguments(parser: argparse.ArgumentParser, defaults: ProtectionSettings, *,
                             rate_limits: bool = True) -> None:
    """Flags (with environment defaults) for the settings; `protection_from_args` reads them."""
    group = parser.add_argument_group("overload protection")
    for name, flag, env, kind, text in _FLAGS:
        if not rate_limits and name in ("booking_rate_per_second", "booking_burst"):
            continue
        default = kind(os.environ.get(env, getattr(defaults, name)))
        metavar = "MS" if name.endswith("_ms") else "N"
        group.add_argument(flag, dest=f"protection_{name}", type=kind, default=default, metavar=metavar,
                           help=f"{text} (default {default}; env {env})")


def protection_from_args(args: argparse.Namespace, defaults: ProtectionSettings) -> ProtectionSettings:
    values = {name: getattr(args, f"protection_{name}") for name, *_ in _FLAGS
              if hasattr(args, f"protection_{name}")}
    for name, value in values.items():
        if value < 0 or (name == "booking_burst" and value < 1):
            raise SystemExit(f"{name} must be {'at least 1' if name == 'booking_burst' else '>= 0'}")
    return dataclasses.replace(defaults, **values)
