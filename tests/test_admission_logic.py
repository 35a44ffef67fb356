"""common.admission as plain logic: token buckets on a fake clock, admission limits,
queue budgets and priorities on an event loop, the event-loop lag estimator and the
lag rule per class (no servers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from common.admission import (
    BOOKING,
    LOOP_LAG,
    PRIORITY,
    QUEUE_FULL,
    QUEUE_TIMEOUT,
    READ,
    AdmissionController,
    ClassLimits,
    LoopLagEstimator,
    LoopLagMonitor,
    ProtectionSettings,
    RateLimiter,
    Shed,
    build_protection,
    client_key,
    retry_after_header,
    route_class,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- token buckets --------------------------------------------------------------------
def test_a_new_client_gets_its_burst_then_waits_for_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2.0, 3, clock=clock)
    assert [limiter.check("a") for _ in range(3)] == [None, None, None]
    wait = limiter.check("a")
    assert wait == pytest.approx(0.5)  # one token at 2/s
    assert retry_after_header(wait) == "1"


def test_tokens_refill_at_the_rate_and_never_beyond_the_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2.0, 3, clock=clock)
    for _ in range(3):
        limiter.check("a")
    clock.advance(0.5)  # one token back
    assert limiter.check("a") is None
    assert limiter.check("a") is not None
    clock.advance(3600)  # a long pause saves up the burst, not more
    assert [limiter.check("a") for _ in range(4)][:3] == [None, None, None]
    assert limiter.check("a") is not None


def test_refused_requests_do_not_spend_tokens() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 1, clock=clock)
    assert limiter.check("a") is None
    clock.advance(0.25)
    assert limiter.check("a") == pytest.approx(0.75)
    assert limiter.check("a") == pytest.approx(0.75)  # asking again costs nothing
    clock.advance(0.75)
    assert limiter.check("a") is None


def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one() -> None:
    clock = FakeClock()
    limiter = RateLimiter(0.2, 1, clock=clock)  # one booking per 5 s
    limiter.check("a")
    wait = limiter.check("a")
    assert wait == pytest.approx(5.0)
    assert wait is not None and retry_after_header(wait) == "5"
    assert retry_after_header(0.01) == "1"
    assert retry_after_header(4.2) == "5"


def test_clients_have_separate_buckets() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 2, clock=clock)
    assert limiter.check("a") is None and limiter.check("a") is None
    assert limiter.check("a") is not None
    assert limiter.check("b") is None  # another client is not affected


def test_memory_is_bounded_by_max_keys() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 5, max_keys=100, clock=clock)
    for n in range(1000):
        limiter.check(f"client-{n}")
    assert len(limiter) == 100


def test_idle_buckets_that_refilled_are_forgotten() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, 5, clock=clock)  # refilled after 0.5 s
    for n in range(50):
        limiter.check(f"client-{n}")
    clock.advance(1.0)
    for _ in range(30):
        limiter.check("busy")
        clock.advance(0.1)
    assert len(limiter) < 10  # the crowd is gone, the busy client stays
    assert limiter.check("busy") is None


def test_an_evicted_busy_client_gets_at_most_a_fresh_burst() -> None:
    # The documented bound: beyond max_keys the least recently used bucket is dropped.
    clock = FakeClock()
    limiter = RateLimiter(1.0, 2, max_keys=2, clock=clock)
    limiter.check("a")
    limiter.check("a")
    assert limiter.check("a") is not None
    limiter.check("b")
    limiter.check("c")  # "a" is the least recently used of three: dropped
    assert limiter.check("a") is None


def test_client_keys() -> None:
    assert client_key("127.0.0.2") == "127.0.0.2"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::7")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert client_key(None) == "unknown"


def test_route_classes() -> None:
    assert route_class("POST", "/api/bookings") == BOOKING
    assert route_class("POST", "/api/bookings/0b5c2f3e-0000-4000-8000-000000000000/cancel") == BOOKING
    assert route_class("GET", "/api/events") == READ
    assert route_class("GET", "/api/bookings/x") == READ
    assert route_class("GET", "/shards/shard-1/api/events/x/ticket-tiers") == READ
    assert route_class("POST", "/shards/shard-1/api/bookings") == BOOKING
    for never in ("/api/health", "/api/ready", "/shards/shard-1/api/ready", "/admin/events", "/metrics", "/"):
        assert route_class("GET", never) is None


# -- admission -------------------------------------------------------------------------
def controller(reads: int = 2, bookings: int = 2, read_queue: float = 0.05,
               booking_queue: float = 5.0, max_queue: int = 10) -> AdmissionController:
    return AdmissionController({
        READ: ClassLimits(reads, read_queue, max_queue),
        BOOKING: ClassLimits(bookings, booking_queue, max_queue),
    }, process="test")


async def hold(c: AdmissionController, cls: str, release: asyncio.Event,
               admitted: asyncio.Event | None = None) -> str:
    try:
        async with c.admit(cls):
            if admitted is not None:
                admitted.set()
            await release.wait()
            return "served"
    except Shed:
        return "shed"


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the other tasks run until `condition` holds (bounded: they need a few steps)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def test_in_flight_is_bounded_and_a_freed_slot_goes_to_the_first_waiter() -> None:
    c = controller(bookings=2)
    release = asyncio.Event()
    holders = [asyncio.create_task(hold(c, BOOKING, release)) for _ in range(2)]
    await until(lambda: c.in_flight(BOOKING) == 2, "two in flight")
    third_admitted = asyncio.Event()
    third_release = asyncio.Event()
    third = asyncio.create_task(hold(c, BOOKING, third_release, third_admitted))
    await until(lambda: c.queued(BOOKING) == 1, "the third waits")
    assert not third_admitted.is_set()
    release.set()
    await until(third_admitted.is_set, "the third gets a freed slot")
    assert c.in_flight(BOOKING) <= 2
    third_release.set()
    assert await asyncio.gather(*holders, third) == ["served"] * 3
    assert c.in_flight(BOOKING) == 0 and c.queued(BOOKING) == 0
    assert c.admitted_counts[BOOKING] == 3 and c.shed_counts[BOOKING] == 0


async def test_a_waiter_is_shed_when_its_queue_budget_is_spent() -> None:
    c = controller(reads=1, read_queue=0.02)
    release = asyncio.Event()
    holder = asyncio.create_task(hold(c, READ, release))
    await until(lambda: c.in_flight(READ) == 1, "one read in flight")
    assert await hold(c, READ, asyncio.Event()) == "shed"  # nothing frees the slot in time
    assert c.shed_counts[READ] == 1 and c.queued(READ) == 0
    release.set()
    assert await holder == "served"
    assert c.in_flight(READ) == 0


async def test_a_full_queue_sheds_at_once() -> None:
    c = controller(bookings=1, booking_queue=30.0, max_queue=2)
    release = asyncio.Event()
    tasks = [asyncio.create_task(hold(c, BOOKING, release)) for _ in range(3)]
    await until(lambda: c.queued(BOOKING) == 2, "two waiting")
    assert await hold(c, BOOKING, release) == "shed"  # the queue is full: no wait at all
    release.set()
    assert await asyncio.gather(*tasks) == ["served"] * 3


async def test_reads_are_shed_while_a_booking_waits() -> None:
    c = controller(reads=5, bookings=1, read_queue=10.0, booking_queue=30.0)
    release_booking = asyncio.Event()
    booking = asyncio.create_task(hold(c, BOOKING, release_booking))
    await until(lambda: c.in_flight(BOOKING) == 1, "a booking in flight")
    # Reads still flow while no booking waits.
    assert await hold(c, READ, _set()) == "served"
    waiting_booking = asyncio.create_task(hold(c, BOOKING, _set()))
    await until(lambda: c.queued(BOOKING) == 1, "a booking waits")
    assert await hold(c, READ, _set()) == "shed"  # read slots are free, yet the read is shed
    release_booking.set()
    assert await asyncio.gather(booking, waiting_booking) == ["served", "served"]
    assert await hold(c, READ, _set()) == "served"  # nobody waits: reads flow again


async def test_waiting_reads_are_shed_when_a_booking_starts_to_wait() -> None:
    c = controller(reads=1, bookings=1, read_queue=30.0, booking_queue=30.0)
    release = asyncio.Event()
    read_holder = asyncio.create_task(hold(c, READ, release))
    booking_holder = asyncio.create_task(hold(c, BOOKING, release))
    await until(lambda: c.in_flight(READ) == 1 and c.in_flight(BOOKING) == 1, "both in flight")
    waiting_read = asyncio.create_task(hold(c, READ, release))
    await until(lambda: c.queued(READ) == 1, "a read waits")
    waiting_booking = asyncio.create_task(hold(c, BOOKING, release))
    assert await waiting_read == "shed"  # long before its 30 s budget
    release.set()
    assert await asyncio.gather(read_holder, booking_holder, waiting_booking) == ["served"] * 3


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    c = controller(bookings=1, booking_queue=30.0)
    release = asyncio.Event()
    holder = asyncio.create_task(hold(c, BOOKING, release))
    await until(lambda: c.in_flight(BOOKING) == 1, "one in flight")
    waiter = asyncio.create_task(hold(c, BOOKING, release))
    await until(lambda: c.queued(BOOKING) == 1, "one waits")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert c.queued(BOOKING) == 0
    release.set()
    assert await holder == "served"
    assert c.in_flight(BOOKING) == 0  # no slot leaked


async def test_a_class_without_a_limit_is_never_shed() -> None:
    c = controller(reads=0, bookings=1, booking_queue=30.0)
    release = asyncio.Event()
    holder = asyncio.create_task(hold(c, BOOKING, release))
    await until(lambda: c.in_flight(BOOKING) == 1, "one booking in flight")
    waiter = asyncio.create_task(hold(c, BOOKING, release))
    await until(lambda: c.queued(BOOKING) == 1, "a booking waits")
    readers = [asyncio.create_task(hold(c, READ, release)) for _ in range(50)]
    await until(lambda: c.in_flight(READ) == 50, "every read admitted")
    release.set()
    assert set(await asyncio.gather(holder, waiter, *readers)) == {"served"}


async def polled(condition: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    """Poll `condition` until it holds, for at most `seconds` (for a timer-driven task)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.002)


# -- event-loop lag -----------------------------------------------------------------------
def test_the_lag_is_the_minimum_over_the_window() -> None:
    lag = LoopLagEstimator(window=0.1)
    assert lag.lag() == 0.0  # nothing measured yet
    for i, sample in enumerate([0.040, 0.060, 0.050, 0.070]):
        lag.record(1000.0 + i * 0.02, sample)
    assert lag.lag() == pytest.approx(0.040)


def test_one_slow_step_is_not_a_standing_lag() -> None:
    lag = LoopLagEstimator(window=0.1)
    lag.record(1000.00, 0.001)
    lag.record(1000.25, 0.240)  # a burst held the loop once...
    assert lag.lag() == pytest.approx(0.240)  # (the newest sample always counts)
    lag.record(1000.26, 0.001)  # ...and the next wake-up is on time again
    assert lag.lag() == pytest.approx(0.001)


def test_a_lag_that_stays_high_for_a_window_is_seen_and_old_samples_leave_it() -> None:
    lag = LoopLagEstimator(window=0.1)
    lag.record(1000.00, 0.001)
    now = 1000.0
    for _ in range(5):  # the loop runs 60 ms late, step after step
        now += 0.07
        lag.record(now, 0.060)
    assert lag.lag() == pytest.approx(0.060)  # the on-time sample is older than the window
    now += 0.05
    lag.record(now, 0.120)  # later and later: the minimum follows once the window has moved on
    assert lag.lag() == pytest.approx(0.060)
    now += 0.11
    lag.record(now, 0.110)
    assert lag.lag() == pytest.approx(0.110)


def test_the_estimator_needs_a_positive_window() -> None:
    with pytest.raises(ValueError):
        LoopLagEstimator(window=0)


class FakeLag:
    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def lag_controller(lag: FakeLag, reads: int = 8, bookings: int = 8) -> AdmissionController:
    return AdmissionController({
        READ: ClassLimits(reads, 1.0, 10, lag_target=0.030),
        BOOKING: ClassLimits(bookings, 1.0, 10, lag_target=0.100),
    }, process="test", lag=lag)


async def test_reads_are_shed_at_a_lower_lag_than_bookings() -> None:
    lag = FakeLag()
    c = lag_controller(lag)
    assert await hold(c, READ, _set()) == "served" and await hold(c, BOOKING, _set()) == "served"
    lag.seconds = 0.050  # above the read target, below the booking target
    assert c.lagging(READ) and not c.lagging(BOOKING)
    assert await hold(c, READ, _set()) == "shed"
    assert await hold(c, BOOKING, _set()) == "served"
    lag.seconds = 0.150  # above both
    assert await hold(c, READ, _set()) == "shed" and await hold(c, BOOKING, _set()) == "shed"
    lag.seconds = 0.010  # the loop is on time again: both flow
    assert await hold(c, READ, _set()) == "served" and await hold(c, BOOKING, _set()) == "served"
    assert c.shed_reasons == {(READ, LOOP_LAG): 2, (BOOKING, LOOP_LAG): 1}
    assert c.in_flight(READ) == 0 and c.in_flight(BOOKING) == 0  # a shed request took no slot


async def test_the_lag_rule_applies_without_an_in_flight_limit_and_only_with_a_target() -> None:
    lag = FakeLag()
    lag.seconds = 1.0
    c = lag_controller(lag, reads=0, bookings=0)
    assert await hold(c, READ, _set()) == "shed" and await hold(c, BOOKING, _set()) == "shed"
    no_targets = AdmissionController({READ: ClassLimits(0, 1.0), BOOKING: ClassLimits(0, 1.0)},
                                     process="test", lag=lag)
    assert await hold(no_targets, READ, _set()) == "served"
    no_monitor = AdmissionController({READ: ClassLimits(0, 1.0, lag_target=0.03)}, process="test")
    assert not no_monitor.lagging(READ)


async def test_shed_reasons_are_counted_apart() -> None:
    c = controller(reads=1, bookings=1, read_queue=0.0, booking_queue=0.02)
    release = asyncio.Event()
    readers = asyncio.create_task(hold(c, READ, release))
    bookers = asyncio.create_task(hold(c, BOOKING, release))
    await until(lambda: c.in_flight(READ) == 1 and c.in_flight(BOOKING) == 1, "both in flight")
    assert await hold(c, READ, _set()) == "shed"  # read queue budget 0: no queue at all
    assert await hold(c, BOOKING, _set()) == "shed"  # waited 20 ms for a slot
    waiting = asyncio.create_task(hold(c, BOOKING, _set()))
    await until(lambda: c.queued(BOOKING) == 1, "a booking waits")
    assert await hold(c, READ, _set()) == "shed"  # a booking waits: reads go first
    release.set()
    await asyncio.gather(readers, bookers, waiting)
    assert c.shed_reasons == {(READ, QUEUE_FULL): 1, (BOOKING, QUEUE_TIMEOUT): 1, (READ, PRIORITY): 1}


async def test_the_monitor_runs_with_the_app_lifecycle() -> None:
    protection = build_protection(ProtectionSettings(read_lag_ms=30.0), "test")
    monitor = protection.monitor
    assert len(protection.middlewares) == 1
    lifecycle = protection.lifecycle(None)  # type: ignore[arg-type]
    await lifecycle.__anext__()
    samples = monitor.estimator._samples
    await polled(lambda: len(samples) > 0, "a wake-up measured")  # the task runs and measures
    with pytest.raises(StopAsyncIteration):
        await lifecycle.__anext__()  # cleanup: the task is stopped
    assert monitor._task is None
    nothing = build_protection(ProtectionSettings(), "test")
    assert nothing.middlewares == []  # no rule to apply; the monitor's gauge runs all the same


async def test_the_monitor_measures_a_blocked_loop() -> None:
    monitor = LoopLagMonitor("test", interval=0.005, window=10.0)  # a long window keeps the peak
    monitor.start()
    try:
        await polled(lambda: len(monitor.estimator._samples) > 0, "a first wake-up")
        busy_until = time.monotonic() + 0.08
        while time.monotonic() < busy_until:  # the stimulus: hold the loop as CPU-bound work does
            pass
        await polled(lambda: monitor.estimator._samples[-1][1] >= 0.05, "the late wake-up measured")
    finally:
        await monitor.stop()


def _set() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


# -- configuration -----------------------------------------------------------------------
def test_topology_protection_settings_are_validated() -> None:
    from deploy.topology import TopologyError, parse_topology

    base = {"regions": {"a": {}}, "shards": {"s": {"home": "a"}}}
    accepted = {"booking_rate_per_second": 0, "booking_burst": 3, "max_in_flight_reads": 0,
                "max_in_flight_bookings": 16, "read_queue_ms": 0, "booking_queue_ms": 250,
                "read_lag_ms": 0, "booking_lag_ms": 120}
    assert parse_topology({**base, "gateway": accepted}).gateway == accepted
    for bad in ({"booking_burst": 0}, {"booking_burst": 2.5}, {"max_in_flight_reads": -1},
                {"read_queue_ms": float("nan")}, {"booking_rate_per_second": True},
                {"max_in_flight_bookings": "64"}, {"cache_ttl_seconds": 0}, {"read_lag_ms": -1},
                {"booking_lag_ms": float("inf")}):
        with pytest.raises(TopologyError):
            parse_topology({**base, "gateway": bad})


def test_command_line_flags_build_the_settings() -> None:
    import argparse

    from common.admission import (
        GATEWAY_DEFAULTS,
        SERVICE_DEFAULTS,
        add_protection_arguments,
        protection_from_args,
    )

    parser = argparse.ArgumentParser()
    add_protection_arguments(parser, GATEWAY_DEFAULTS)
    args = parser.parse_args(["--booking-rate", "2", "--booking-burst", "3", "--max-in-flight-reads", "0"])
    settings = protection_from_args(args, GATEWAY_DEFAULTS)
    assert (settings.booking_rate_per_second, settings.booking_burst) == (2.0, 3)
    assert settings.max_in_flight_reads == 0 and settings.max_in_flight_bookings == 64
    assert settings.read_lag_ms == GATEWAY_DEFAULTS.read_lag_ms > 0
    lag = protection_from_args(parser.parse_args(["--read-lag-ms", "0", "--booking-lag-ms", "80"]),
                               GATEWAY_DEFAULTS)
    assert (lag.read_lag_ms, lag.booking_lag_ms, lag.sheds) == (0.0, 80.0, True)
    assert 0 < GATEWAY_DEFAULTS.read_lag_ms < GATEWAY_DEFAULTS.booking_lag_ms  # reads shed first
    assert 0 < SERVICE_DEFAULTS.read_lag_ms < SERVICE_DEFAULTS.booking_lag_ms
    service = argparse.ArgumentParser()
    add_protection_arguments(service, SERVICE_DEFAULTS, rate_limits=False)
    with pytest.raises(SystemExit):  # a booking service has no per-client limit to set
        service.parse_args(["--booking-rate", "2"])
    assert protection_from_args(service.parse_args([]), SERVICE_DEFAULTS) == SERVICE_DEFAULTS
