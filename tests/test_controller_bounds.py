"""Issue 16, every controller operation ends within a bound (pure logic on plain fakes):

- a Consul call does not swallow its caller's cancel (Python 3.11's `asyncio.wait_for`
  returns the call's result when the cancel arrives just as the call completes);
- a term of the controller lock ends, and the lock's session is destroyed, even when
  the term's work swallows its cancel (it is logged and left behind, not awaited for
  ever);
- a shard lease is released, its session destroyed and its renewer stopped, even when
  the renewer swallows its cancel (a renewer that survived kept the shard locked, and
  `promote()` waiting for it never returned: the controller's `inProgress` stayed
  `['shard-1']`);
- a promotion that never ends (and ignores its cancel) ends for the controller within
  `operation_timeout` of its own clock: the shard leaves `inProgress`, is tried again
  after a backoff, and the backoff grows with each consecutive failure;
- a refused promotion is retried after its backoff, not left stuck.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from failover.controller import Controller, Settings, Suspect
from failover.leadership import STOP_WAIT, Leadership, Term
from failover.lease import Lease
from failover.promote import PromoteRefused, PromoteReport
from region_map import RegionMap, ServiceInstance, Shard, ShardMember
from region_map.consul_store import ConsulMapStore
from tests.support import poll

SHARD = "c-east"
BOUND = 5.0  # how long a test waits for what must end much sooner


def member(region: str, zone: str = "a", port: int = 5000) -> ShardMember:
    return ShardMember(region, f"http://svc/{region}/{zone}", f"127.0.0.1:{port}", zone)


def shard() -> Shard:
    return Shard(SHARD, 3, "east", {"east": member("east", port=5001),
                                    "east/b": member("east", "b", 5002)},
                 sync_standbys=("east/b",), sync_mode="zone")


async def swallow_cancels_until(let_go: asyncio.Event) -> None:
    """A call that does not end before `let_go` (the test's end), and survives every
    cancel meanwhile, as wait_for's bug lets one."""
    while not let_go.is_set():
        try:
            await let_go.wait()
        except asyncio.CancelledError:
            continue


# --- a Consul call -----------------------------------------------------------------------------

async def test_a_consul_call_does_not_swallow_its_callers_cancel() -> None:
    store = ConsulMapStore(timeout=BOUND)
    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    caller = asyncio.create_task(store._call(answer))
    await asyncio.sleep(0)  # one step of the loop: the caller now awaits the answer
    answer.set_result(1)  # the call completes...
    caller.cancel()  # ...in the very iteration its caller is cancelled
    with pytest.raises(asyncio.CancelledError):
        await caller


# --- a lease -------------------------------------------------------------------------------------

class LeaseStore:
    """Sessions and locks; a renewal blocks for ever and swallows its cancel."""

    def __init__(self) -> None:
        self.renewing = asyncio.Event()
        self.gone = False  # the test's end: the session is gone, a renewer still alive stops
        self.destroyed: list[str] = []

    async def create_session(self, name: str, ttl: float) -> str:
        return "s1"

    async def acquire_lock_sequenced(self, name: str, session: str, value: Any) -> int:
        return 7

    async def renew_session(self, session: str) -> bool:
        if self.gone:
            return False
        self.renewing.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return True  # what 3.11's wait_for does when the call completes as it is cancelled
        return True

    async def destroy_session(self, session: str) -> None:
        self.destroyed.append(session)


async def test_a_lease_is_released_even_when_its_renewer_swallows_its_cancel() -> None:
    store = LeaseStore()
    lease = await Lease.take(store, "shard-op-c-east", "test", ttl=0.3)  # type: ignore[arg-type]
    await asyncio.wait_for(store.renewing.wait(), BOUND)  # the renewer is inside a renewal
    release = asyncio.create_task(lease.release())
    try:
        done, _ = await asyncio.wait([release], timeout=BOUND)
        assert release in done, "release() did not return: the renewer's swallowed cancel held it"
        assert store.destroyed == ["s1"]  # the session, hence the lock, is gone
        assert lease._task is not None and lease._task.done()  # and the renewer stopped
    finally:
        store.gone = True


# --- a term of the controller lock ---------------------------------------------------------------

class TermStore:
    """The controller lock's session: gone at the first renewal (the term ends)."""

    def __init__(self) -> None:
        self.destroyed: list[str] = []

    async def renew_session(self, session: str) -> bool:
        return False

    async def destroy_session(self, session: str) -> None:
        self.destroyed.append(session)


async def test_a_term_ends_even_when_its_work_swallows_its_cancel() -> None:
    """The term's work ignores its cancel: the term still ends (the lock's session is
    destroyed, the controller inactive), the work left behind, logged."""
    store = TermStore()
    leadership = Leadership(store, {"region": "east"}, ttl=0.2)  # type: ignore[arg-type]
    let_go = asyncio.Event()

    async def work(term: Term) -> None:
        await swallow_cancels_until(let_go)

    hold = asyncio.create_task(leadership._hold(Term("s1", time.time()), time.monotonic(), work))
    try:
        done, _ = await asyncio.wait([hold], timeout=STOP_WAIT + BOUND)
        assert hold in done, "the term did not end: its work swallowed its cancel"
        assert store.destroyed == ["s1"] and not leadership.active
    finally:
        let_go.set()
        await asyncio.wait([hold], timeout=BOUND)


# --- the controller ------------------------------------------------------------------------------

class Tasks:
    """What `_round` needs of a TaskGroup: `create_task`, the tasks kept for the test."""

    def __init__(self) -> None:
        self.started: list[asyncio.Task[None]] = []

    def create_task(self, coro: Coroutine[Any, Any, None], *, name: str | None = None) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self.started.append(task)
        return task


def controller_with_a_dead_primary(settings: Settings) -> Controller:
    """A controller whose map has one shard, whose Consul check of the primary is
    critical and whose probe finds the primary's host lost: due for a failover."""

    class NoStore:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the store was used: {name}")

    controller = Controller(NoStore(), "token", settings)  # type: ignore[arg-type]
    record = shard()
    controller.map._current = RegionMap(shards={SHARD: record})
    controller.map._healthy = True
    controller.health.reachable = True
    controller.health._instances = [ServiceInstance("booking-service", "i", "127.0.0.1", 1, (),
                                                    passing=False, url=record.primary.service_url)]

    async def lost(_: Shard) -> str:
        return "lost"

    async def decide(name: str, suspect: Suspect) -> tuple[str, bool]:
        return "east/b", False

    controller._probe_state = lost  # type: ignore[method-assign]
    controller._decide = decide  # type: ignore[method-assign]
    return controller


async def started_failover(controller: Controller, tasks: Tasks) -> asyncio.Task[None]:
    """Rounds until the controller starts a failover of the shard (the grace is 0)."""
    async def started() -> bool:
        await controller._round(tasks)  # type: ignore[arg-type]
        return bool(tasks.started) and not tasks.started[-1].done()
    await poll(started, "the controller starts a failover", timeout=BOUND)
    assert controller.status()["inProgress"] == [SHARD]
    return tasks.started[-1]


async def ended(task: asyncio.Task[None]) -> bool:
    done, _ = await asyncio.wait([task], timeout=BOUND)
    return task in done


async def test_a_promotion_that_never_ends_is_given_up_within_the_bound_and_retried() -> None:
    controller = controller_with_a_dead_primary(Settings("east", grace=0.0, retry=0.05,
                                                         operation_timeout=0.3))
    attempts: list[float] = []
    let_go = asyncio.Event()

    async def stuck(name: str, target: str) -> PromoteReport:
        attempts.append(time.monotonic())
        await swallow_cancels_until(let_go)
        raise PromoteRefused("test-over", "let go at the test's end")

    controller._promote = stuck  # type: ignore[method-assign]
    tasks = Tasks()
    try:
        await stuck_twice(controller, tasks, attempts)
    finally:
        let_go.set()
        await asyncio.wait([*tasks.started, *controller.overdue], timeout=BOUND)


async def stuck_twice(controller: Controller, tasks: Tasks, attempts: list[float]) -> None:
    first = await started_failover(controller, tasks)
    assert await ended(first), "the failover did not end within its bound"
    assert controller.status()["inProgress"] == []
    assert controller.history[-1].outcome == "timed-out"
    assert controller.not_before[SHARD] > time.monotonic()  # not at once: after a backoff
    first_backoff_until = controller.not_before[SHARD]

    second = await started_failover(controller, tasks)  # tried again once the backoff is over

    async def promoting_again() -> bool:
        return len(attempts) == 2
    await poll(promoting_again, "the second promotion starts", timeout=BOUND)
    assert attempts[1] >= first_backoff_until
    assert await ended(second)
    assert controller.status()["inProgress"] == []
    assert controller.failures[SHARD] == 2  # the next pause is twice the first
    assert len(controller.overdue) == 2  # both ignored their cancel: kept, not awaited


async def test_a_refused_promotion_is_retried_after_a_backoff() -> None:
    controller = controller_with_a_dead_primary(Settings("east", grace=0.0, retry=0.05))
    refusals = 0

    async def refused(name: str, target: str) -> PromoteReport:
        nonlocal refusals
        refusals += 1
        raise PromoteRefused("not-most-recent", "another copy holds more")

    controller._promote = refused  # type: ignore[method-assign]
    tasks = Tasks()
    for attempt in (1, 2):
        task = await started_failover(controller, tasks)
        assert await ended(task)
        assert controller.status()["inProgress"] == []
        assert controller.history[-1].outcome == "refused"
        assert refusals == attempt and controller.failures[SHARD] == attempt

