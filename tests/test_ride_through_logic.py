"""The gateway riding through a change of primary (gateway/ride_through.py, gateway/writes.py),
on fakes: a real gateway app in front of a fake booking service that records every attempt,
and a region map held in memory that the test moves on. No Consul, no Postgres.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY

from common.fencing import EPOCH_HEADER
from common.problems import TYPE_BASE
from gateway.app import GATEWAY_KEY, GatewayConfig, create_app
from gateway.ride_through import RideThrough, moved_to, refusal
from region_map import RegionMap, Shard, ShardMember
from region_map.model import Transition

SHARD = "s1"
TIER = str(uuid.uuid4())


# --- fakes -----------------------------------------------------------------------------------

class FakeWatcher:
    """A MapWatcher whose map the test replaces (`publish`), waking waiters as the real one."""

    def __init__(self, first: RegionMap) -> None:
        self._current = first
        self._changed = asyncio.Condition()
        self.healthy = True

    @property
    def current(self) -> RegionMap:
        return self._current

    async def start(self, first_load_timeout: float = 5.0) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def publish(self, new: RegionMap) -> None:
        self._current = new
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[RegionMap], bool], timeout: float) -> RegionMap:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self._current))
            return self._current


class FakeStore:
    async def close(self) -> None:
        pass


@dataclass
class Attempt:
    copy: str
    epoch: str | None
    body: dict[str, Any]
    at: float


Answer = Callable[[str, int], tuple[int, dict[str, Any]]]  # (copy, n-th attempt there) -> answer


@dataclass
class FakeService:
    """Every copy's booking service: answers by `answer`, records every attempt."""

    answer: Answer
    attempts: list[Attempt] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def book(self, request: web.Request) -> web.Response:
        copy = request.match_info["copy"]
        body = await request.json()
        self.attempts.append(Attempt(copy, request.headers.get(EPOCH_HEADER), body, time.monotonic()))
        self.arrived.set()
        status, doc = self.answer(copy, sum(1 for a in self.attempts if a.copy == copy))
        return web.json_response(doc, status=status)


def booked(copy: str, n: int) -> tuple[int, dict[str, Any]]:
    return 201, {"id": str(uuid.uuid4()), "copy": copy}


def problem(kind: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    return 503, {"type": TYPE_BASE + kind, "title": "Service Unavailable", "status": 503,
                 "detail": kind, **extra}


def shard(base_url: str, primary: str = "east", epoch: int = 1,
          transition: Transition | None = None) -> Shard:
    members = {
        "east": ShardMember("east", f"{base_url}/east", "127.0.0.1:1"),
        "east/b": ShardMember("east", f"{base_url}/east-b", "127.0.0.1:2", zone="b"),
    }
    return Shard(SHARD, epoch, primary, members, ("east/b",) if primary == "east" else ("east",),
                 transition=transition)


def region_map(record: Shard, event_id: str) -> RegionMap:
    return RegionMap(shards={SHARD: record}, placements={event_id: SHARD})


@dataclass
class Rig:
    gateway: str
    service: FakeService
    watcher: FakeWatcher
    event_id: str
    service_url: str
    session: aiohttp.ClientSession
    ride: RideThrough | None = None  # the gateway's own

    async def book(self, reference: str | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], Any]:
        body: dict[str, Any] = {"eventId": self.event_id,
                                "items": [{"ticketTierId": TIER, "quantity": 1}]}
        if reference is not None:
            body["clientReference"] = reference
        async with self.session.post(f"{self.gateway}/api/bookings", json=body,
                                     headers=headers or {}) as resp:
            return resp.status, await resp.json(content_type=None), resp.headers

    async def move_to(self, record: Shard) -> None:
        await self.watcher.publish(region_map(record, self.event_id))


def held_writes() -> float:
    return REGISTRY.get_sample_value("boxoffice_gateway_held_writes", {"shard": SHARD}) or 0.0


def holds(reason: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("boxoffice_gateway_write_hold_seconds_count",
                                     {"reason": reason, "outcome": outcome}) or 0.0


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)  # poll interval


@pytest.fixture
async def rig_factory() -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []
    sessions: list[aiohttp.ClientSession] = []

    async def make(answer: Answer, *, transition: bool = False, retry_seconds: float = 5.0,
                   service_url: str | None = None) -> Rig:
        service = FakeService(answer)
        app = web.Application()
        app.router.add_post("/{copy}/api/bookings", service.book)
        backend = TestServer(app, host="127.0.0.1")
        await backend.start_server()
        servers.append(backend)
        base = service_url or str(backend.make_url("")).rstrip("/")
        event_id = str(uuid.uuid4())
        first = shard(base, transition=Transition.begin("switchover", "east/b", 1) if transition else None)
        watcher = FakeWatcher(region_map(first, event_id))
        config = GatewayConfig(region="east", write_retry_seconds=retry_seconds, write_attempt_seconds=1.0)
        gateway_app = create_app(config, FakeStore(), watcher)  # type: ignore[arg-type]
        gateway = TestServer(gateway_app, host="127.0.0.1")
        await gateway.start_server()
        servers.append(gateway)
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Rig(str(gateway.make_url("")).rstrip("/"), service, watcher, event_id,
                   str(backend.make_url("")).rstrip("/"), session, gateway_app[GATEWAY_KEY].writes.ride)

    yield make
    for session in sessions:
        await session.close()
    for server in reversed(servers):
        await server.close()


# --- held during a transition ------------------------------------------------------------------

async def test_a_held_write_is_released_by_the_map_change(rig_factory: Callable[..., Any]) -> None:
    rig: Rig = await rig_factory(booked, transition=True)
    released_before = holds("transition", "released")
    reference = f"ride-{uuid.uuid4().hex}"
    client = asyncio.create_task(rig.book(reference))
    await until(lambda: held_writes() == 1, "the write to be held")
    assert rig.service.attempts == []  # nothing is sent while the shard is in transition

    moved_at = time.monotonic()
    await rig.move_to(shard(rig.service_url, primary="east/b", epoch=2))
    status, doc, _ = await client
    assert status == 201, doc
    assert [(a.copy, a.epoch, a.body["clientReference"]) for a in rig.service.attempts] == [
        ("east-b", "2", reference)]  # straight to the new primary, at the new epoch, same key
    assert rig.service.attempts[0].at >= moved_at
    assert held_writes() == 0 and holds("transition", "released") == released_before + 1
    print(f"released {1000 * (rig.service.attempts[0].at - moved_at):.1f} ms after the map change")


async def test_a_rolled_back_transition_releases_to_the_same_primary(rig_factory: Callable[..., Any]) -> None:
    rig: Rig = await rig_factory(booked, transition=True)
    client = asyncio.create_task(rig.book(f"ride-{uuid.uuid4().hex}"))
    await until(lambda: held_writes() == 1, "the write to be held")
    await rig.move_to(shard(rig.service_url))  # the transition cleared, same primary and epoch
    status, _, _ = await client
    assert status == 201
    assert [(a.copy, a.epoch) for a in rig.service.attempts] == [("east", "1")]


async def test_a_write_held_past_the_window_is_a_503_with_its_key(rig_factory: Callable[..., Any]) -> None:
    rig: Rig = await rig_factory(booked, transition=True, retry_seconds=0.3)
    timeouts_before = holds("transition", "timeout")
    status, doc, headers = await rig.book()  # no reference: the gateway's key comes back
    assert status == 503 and doc["type"].endswith("/shard-in-transition"), doc
    key = headers["Idempotency-Key"]
    assert key.startswith("gw-") and "Retry-After" in headers
    assert rig.service.attempts == [] and held_writes() == 0
    assert holds("transition", "timeout") == timeouts_before + 1

    # once the switchover is over, the same request with the key books under that key
    await rig.move_to(shard(rig.service_url, primary="east/b", epoch=2))
    status, doc, _ = await rig.book(headers={"Idempotency-Key": key})
    assert status == 201, doc
    assert [(a.copy, a.body["clientReference"]) for a in rig.service.attempts] == [("east-b", key)]


async def test_an_abandoned_transition_is_not_held(rig_factory: Callable[..., Any]) -> None:
    """A transition the gateway has seen for longer than `stale_transition_seconds` of its
    own clock is abandoned: the write goes to the primary."""
    rig: Rig = await rig_factory(booked)
    assert rig.ride is not None
    now = [100.0]
    rig.ride.transitions.clock = lambda: now[0]
    record = shard(rig.service_url, transition=Transition.begin("switchover", "east/b", 1))
    await rig.move_to(record)
    assert rig.ride.in_transition(record)  # first seen now
    now[0] += rig.ride.stale_transition_seconds + 1
    status, _, _ = await rig.book(f"ride-{uuid.uuid4().hex}")
    assert status == 201 and [a.copy for a in rig.service.attempts] == ["east"]


# --- refusals by epoch ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fenced", "stale-epoch", "not-primary"])
async def test_an_epoch_refusal_waits_for_a_newer_epoch(rig_factory: Callable[..., Any], kind: str) -> None:
    def answer(copy: str, n: int) -> tuple[int, dict[str, Any]]:
        return problem(kind, epoch=2) if copy == "east" else booked(copy, n)

    rig: Rig = await rig_factory(answer)
    reference = f"ride-{uuid.uuid4().hex}"
    client = asyncio.create_task(rig.book(reference))
    await until(lambda: held_writes() == 1, "the refused write to wait for the map")
    assert [(a.copy, a.epoch) for a in rig.service.attempts] == [("east", "1")]  # not retried there

    await rig.move_to(shard(rig.service_url, primary="east/b", epoch=2))
    status, doc, _ = await client
    assert status == 201, doc
    assert [(a.copy, a.epoch, a.body["clientReference"]) for a in rig.service.attempts] == [
        ("east", "1", reference), ("east-b", "2", reference)]


async def test_a_new_primary_finishing_its_promotion_is_retried_soon(rig_factory: Callable[..., Any]) -> None:
    """The map names east/b at epoch 2 already; its service refuses (not-primary, fenced:
    no newer epoch) until its promotion is done: the write is retried there."""
    def answer(copy: str, n: int) -> tuple[int, dict[str, Any]]:
        if n <= 2:
            return problem("not-primary", role="fenced") if n == 1 else problem("fenced", epoch=1)
        return booked(copy, n)

    rig: Rig = await rig_factory(answer)
    await rig.move_to(shard(rig.service_url, primary="east/b", epoch=2))
    status, doc, _ = await rig.book(f"ride-{uuid.uuid4().hex}")
    assert status == 201, doc
    assert [(a.copy, a.epoch) for a in rig.service.attempts] == [("east-b", "2")] * 3


async def test_an_unreachable_primary_waits_for_the_map_to_name_another(
        rig_factory: Callable[..., Any]) -> None:
    rig: Rig = await rig_factory(booked)
    dead = "http://127.0.0.1:9"  # discard port: connection refused
    await rig.move_to(replace(shard(rig.service_url), members={
        **shard(rig.service_url).members, "east": ShardMember("east", f"{dead}/east", "127.0.0.1:1")}))
    client = asyncio.create_task(rig.book(f"ride-{uuid.uuid4().hex}"))
    await until(lambda: held_writes() == 1, "the write to wait for the map")
    await rig.move_to(shard(rig.service_url, primary="east/b", epoch=2))
    status, _, _ = await client
    assert status == 201 and [(a.copy, a.epoch) for a in rig.service.attempts] == [("east-b", "2")]


# --- pure helpers ------------------------------------------------------------------------------

def test_refusal_reads_the_kind_and_the_epoch_named() -> None:
    assert refusal(503, b'{"type": "https://x/problems/fenced", "epoch": 4}') == ("fenced", 4)
    assert refusal(503, b'{"type": "https://x/problems/not-primary", "role": "fenced"}') == (
        "not-primary", None)
    assert refusal(503, b'{"type": "x/stale-epoch", "epoch": true}') == ("stale-epoch", None)
    assert refusal(503, b"not json") == ("", None)
    assert refusal(503, b"[1]") == ("", None)
    assert refusal(409, b'{"type": "x/fenced", "epoch": 4}') == ("", None)


def test_a_transition_is_held_until_it_is_stale_by_the_gateways_own_clock() -> None:
    """Stale after 30 s of the gateway's own monotonic time since it first saw the
    transition; the wall time in `since` (31 s old here) decides nothing
    (tests/test_supersede_logic.py has the skewed clocks)."""
    now = [500.0]
    ride = RideThrough(FakeWatcher(RegionMap()), stale_transition_seconds=30, clock=lambda: now[0])
    old = (datetime.now(UTC) - timedelta(seconds=31)).isoformat()
    record = shard("http://h", transition=Transition("switchover", "east/b", old, 1))
    assert ride.in_transition(record)
    now[0] += 30.5
    assert not ride.in_transition(record)
    assert ride.in_transition(shard("http://h", transition=Transition.begin("switchover", "east/b", 1)))
    assert not ride.in_transition(shard("http://h"))


def test_moved_to_names_the_shard_of_an_event_moved_answer_only() -> None:
    moved = b'{"type": "https://boxoffice.example/problems/event-moved", "shard": "shard-2"}'
    assert moved_to(421, moved) == "shard-2"
    assert moved_to(503, moved) is None  # not a 421
    assert moved_to(421, b'{"type": "x/other", "shard": "shard-2"}') is None
    assert moved_to(421, b'{"type": "x/event-moved", "shard": 7}') is None
    assert moved_to(421, b"not json") is None
