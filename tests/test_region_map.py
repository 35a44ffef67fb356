"""The region map: the model (pure), the store and the watcher on a real Consul agent.

Every Consul test works under its own KV prefix, so tests do not see each
other's records. Nothing here sleeps to wait for something: tests wait on the
watcher's change notifications or on Consul blocking queries, with timeouts.
The test that stops Consul comes last and always starts it again.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web

from common.ids import new_booking_id, routing_prefix
from deploy.consul_agent import ConsulAgent
from deploy.procs import free_port
from region_map import (
    CasConflict,
    ConsulMapStore,
    HealthWatcher,
    LockState,
    MapError,
    MapStore,
    MapWatcher,
    NotFound,
    Placement,
    Region,
    RegionMap,
    ServiceInstance,
    Shard,
    ShardMember,
)


def make_shard(name: str = "shard-1", primary: str = "east", regions: tuple[str, ...] = ("east", "west")
               ) -> Shard:
    return Shard(name, 1, primary, {
        r: ShardMember(r, f"http://127.0.0.1:1/{r}/shards/{name}", f"127.0.0.1:{5400 + n}")
        for n, r in enumerate(regions)
    })


def unique_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}/"


# --- the model, pure --------------------------------------------------------------------

def test_region_json_round_trip_and_nearest_ordering() -> None:
    east = Region("east", "http://127.0.0.1:8081", "Virginia", {"west": 70, "south": 40})
    assert Region.from_json(east.to_json()) == east
    assert east.to_json()["gatewayUrl"] == "http://127.0.0.1:8081"
    # itself first, then by latency, regions without a figure last (by name)
    assert east.nearest(["west", "mars", "south", "east", "moon"]) == [
        "east", "south", "west", "mars", "moon"]
    region_map = RegionMap(regions={"east": east, "west": Region("west", "u", "Oregon", {"east": 70})})
    assert region_map.nearest_regions("east") == ["east", "west"]
    assert region_map.nearest_regions("west") == ["west", "east"]


def test_shard_json_round_trip_and_members() -> None:
    shard = make_shard(regions=("east", "west", "south"))
    assert Shard.from_json(shard.to_json()) == shard
    assert shard.primary.region == "east" and shard.home_region == "east"
    assert shard.replica_in("east") is None
    assert shard.replica_in("west") == shard.members["west"]
    assert shard.replica_in("mars") is None
    assert set(shard.replicas) == {"west", "south"}


def test_with_primary_grows_the_epoch_once_per_change_of_primary() -> None:
    shard = make_shard()
    promoted = shard.with_primary("west")
    assert (promoted.epoch, promoted.primary_region) == (shard.epoch + 1, "west")
    assert promoted.replica_in("east") == shard.members["east"]
    back = promoted.with_primary("east")
    assert (back.epoch, back.primary_region) == (shard.epoch + 2, "east")
    assert shard.with_primary("east") is shard  # not a change of primary: same epoch
    assert shard.epoch == 1  # the original is untouched
    with pytest.raises(ValueError):
        shard.with_primary("mars")


def test_invalid_records_are_refused() -> None:
    member = ShardMember("east", "http://x", "127.0.0.1:5432")
    with pytest.raises(ValueError):
        Shard("s", 1, "west", {"east": member})  # primary region without a member
    with pytest.raises(ValueError):
        Shard("s", 1, "west", {"west": member})  # member filed under another region
    with pytest.raises(ValueError):
        Shard("s", -1, "east", {"east": member})
    for bad in ("", "a/b", " a"):
        with pytest.raises(ValueError):
            Region(bad, "http://x", "here")


def test_placement_json_round_trip() -> None:
    placement = Placement(str(uuid.uuid4()), "shard-1")
    assert Placement.from_json(placement.to_json()) == placement
    region_map = RegionMap(placements={placement.event_id: "shard-1"})
    assert region_map.placement(placement.event_id) == placement
    assert region_map.placement(str(uuid.uuid4())) is None


def test_snapshot_is_read_only_and_carries_key_indexes() -> None:
    shard = make_shard()
    event = str(uuid.uuid4())
    source = {"shard-1": shard}
    region_map = RegionMap(shards=source, placements={event: "shard-1"}, index=42,
                           key_indexes={"shards/shard-1": 40, f"placement/{event}": 42})
    source.clear()  # the snapshot kept its own copy
    assert region_map.shard_for_event(event) == shard
    assert region_map.shard_for_event(str(uuid.uuid4())) is None
    assert region_map.event_ids() == [event]
    with pytest.raises(TypeError):
        region_map.placements[event] = "shard-2"  # type: ignore[index]
    with pytest.raises(TypeError):
        shard.members["mars"] = shard.primary  # type: ignore[index]
    assert region_map.shard_index("shard-1") == 40
    assert region_map.placement_index(event) == 42
    assert region_map.shard_index("shard-9") == 0  # 0: "must not exist yet", ready for a create
    assert region_map.region_index("east") == 0
    assert region_map.to_json()["placements"] == {event: "shard-1"}


def test_booking_prefix_resolves_to_its_event_even_after_a_move() -> None:
    events = [str(uuid.uuid4()) for _ in range(200)]
    region_map = RegionMap(placements={e: "shard-1" for e in events} | {"not-a-uuid": "shard-1"})
    bookings = {e: new_booking_id(uuid.UUID(e)) for e in events}
    for event, booking in bookings.items():
        assert region_map.event_for_prefix(routing_prefix(booking)) == event
        assert region_map.event_for_prefix(booking.bytes) == event  # longer input: first 8 bytes
    assert region_map.event_for_prefix(routing_prefix(uuid.uuid4())) is None
    moved = RegionMap(placements={e: "shard-2" for e in events})
    booking = bookings[events[0]]
    assert moved.event_for_prefix(routing_prefix(booking)) == events[0]
    assert moved.shard_for_event(events[0]) is None  # no shard records in this snapshot


def test_cas_conflict_names_the_key_and_the_expected_index() -> None:
    lost = CasConflict("boxoffice/shards/shard-1", 17)
    assert "boxoffice/shards/shard-1" in str(lost) and "17" in str(lost)
    assert (lost.key, lost.expected_index) == ("boxoffice/shards/shard-1", 17)
    assert "already exists" in str(CasConflict("boxoffice/placement/x", 0))
    assert isinstance(lost, MapError)


# --- MapStore's own loops and MapWatcher's index rules, on plain fakes ---------------------

class MemoryStore(MapStore):
    """Check-and-set records in a dict: enough for the loops `MapStore` builds on them."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[object, int]] = {}
        self.last_index = 0
        self.reads = 0

    def write(self, key: str, value: object, expected: int) -> None:
        current = self.records.get(key, (None, 0))[1]
        if current != expected:
            raise CasConflict(key, expected)
        self.last_index += 1
        self.records[key] = (value, self.last_index)

    async def read_shard(self, name: str) -> tuple[Shard, int]:
        self.reads += 1
        if f"shards/{name}" not in self.records:
            raise NotFound(name)
        value, index = self.records[f"shards/{name}"]
        assert isinstance(value, Shard)
        return value, index

    async def read_placement(self, event_id: str) -> tuple[str, int]:
        if f"placement/{event_id}" not in self.records:
            raise NotFound(event_id)
        value, index = self.records[f"placement/{event_id}"]
        return str(value), index

    async def _write_shard(self, shard: Shard, expected_index: int) -> None:
        self.write(f"shards/{shard.name}", shard, expected_index)

    async def place_event(self, event_id: str, shard: str, expected_index: int,
                          since_lsn: str | None = None) -> None:
        self.write(f"placement/{event_id}", shard, expected_index)

    async def put_region(self, region: Region, expected_index: int) -> None:
        self.write(f"regions/{region.name}", region, expected_index)

    async def unplace_event(self, event_id: str, expected_index: int) -> None:
        raise NotImplementedError

    async def load(self) -> RegionMap:
        raise NotImplementedError

    async def watch(self, index: int, wait_seconds: float = 30.0) -> RegionMap:
        raise NotImplementedError

    async def delete_all(self) -> None:
        self.records.clear()

    async def register_service(self, service: str, instance_id: str, address: str, port: int,
                               tags: list[str], health_url: str | None, url: str = "",
                               meta: Any = None) -> None:
        raise NotImplementedError

    async def deregister_service(self, instance_id: str) -> None:
        raise NotImplementedError

    async def watch_healthy_instances(self, service: str, index: int, wait_seconds: float = 30.0
                                      ) -> tuple[int, list[ServiceInstance]]:
        raise NotImplementedError

    async def watch_instances(self, service: str, index: int, wait_seconds: float = 30.0
                              ) -> tuple[int, list[ServiceInstance]]:
        raise NotImplementedError

    async def close(self) -> None:
        pass

    # journals and locks are tested on Consul (tests/test_map_epochs.py)
    async def put_journal(self, op_id: str, doc: dict[str, Any], expected_index: int) -> int:
        raise NotImplementedError

    async def read_journal(self, op_id: str) -> tuple[dict[str, Any], int]:
        raise NotImplementedError

    async def list_journals(self, kind_prefix: str = "") -> dict[str, tuple[dict[str, Any], int]]:
        raise NotImplementedError

    async def delete_journal(self, op_id: str, expected_index: int) -> None:
        raise NotImplementedError

    async def create_session(self, name: str, ttl_seconds: float) -> str:
        raise NotImplementedError

    async def renew_session(self, session_id: str) -> bool:
        raise NotImplementedError

    async def destroy_session(self, session_id: str) -> None:
        raise NotImplementedError

    async def acquire_lock(self, name: str, session_id: str, value: dict[str, Any]) -> bool:
        raise NotImplementedError

    async def release_lock(self, name: str, session_id: str) -> bool:
        raise NotImplementedError

    async def lock_holder(self, name: str) -> LockState:
        raise NotImplementedError

    async def watch_lock(self, name: str, index: int, wait_seconds: float = 30.0) -> LockState:
        raise NotImplementedError


async def test_update_shard_gives_up_after_a_bounded_number_of_lost_races() -> None:
    store = MemoryStore()
    await store.put_shard(make_shard(), 0)

    def change_while_a_rival_writes(shard: Shard) -> Shard:
        current, index = store.records["shards/shard-1"]
        store.write("shards/shard-1", current, index)  # a rival wins between our read and write
        return shard.with_primary("west")

    with pytest.raises(CasConflict) as lost:
        await store.update_shard("shard-1", change_while_a_rival_writes, attempts=3)
    assert store.reads == 3 and lost.value.attempts == 3
    assert store.records["shards/shard-1"][0] == make_shard()  # our change never landed

    with pytest.raises(NotFound):
        await store.update_shard("shard-9", lambda s: s)
    with pytest.raises(ValueError):
        await store.update_shard("shard-1", lambda s: replace(s, name="other"))
    index = store.records["shards/shard-1"][1]
    assert await store.update_shard("shard-1", lambda s: s) == make_shard()  # no-op: no write
    assert store.records["shards/shard-1"][1] == index


class ScriptedStore(MemoryStore):
    """`watch` answers from a script the test feeds, and reports the index it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: asyncio.Queue[int] = asyncio.Queue()
        self.answers: asyncio.Queue[RegionMap | Exception] = asyncio.Queue()

    async def watch(self, index: int, wait_seconds: float = 30.0) -> RegionMap:
        self.asked.put_nowait(index)
        answer = await self.answers.get()
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_watcher_follows_consuls_blocking_query_index_rules() -> None:
    store = ScriptedStore()
    watcher = MapWatcher(store, min_backoff=0.01)
    seen: list[RegionMap] = []
    watcher.add_listener(seen.append)

    async def next_ask() -> int:
        return await asyncio.wait_for(store.asked.get(), 2)

    first = RegionMap(placements={"e1": "shard-1"}, index=10)
    store.answers.put_nowait(first)
    await watcher.start(first_load_timeout=2)
    assert watcher.current is first and watcher.healthy and seen == [first]
    try:
        assert await next_ask() == 0  # the first query is a plain read
        assert await next_ask() == 10  # then block on the index it returned
        # returned early with the same index and nothing new: not a change
        store.answers.put_nowait(RegionMap(placements={"e1": "shard-1"}, index=10))
        assert await next_ask() == 10
        assert seen == [first]
        # the index went backwards: publish, then start over from 0
        reset = RegionMap(placements={"e2": "shard-1"}, index=5)
        store.answers.put_nowait(reset)
        assert await watcher.wait_for(lambda m: "e2" in m.placements, 2) is reset
        assert await next_ask() == 0
        # an index below 1 is never waited on (it would return at once, forever)
        store.answers.put_nowait(RegionMap(placements={"e3": "shard-1"}, index=0))
        await watcher.wait_for(lambda m: "e3" in m.placements, 2)
        assert await next_ask() == 1
        # a failure keeps the map, and the next success brings the watcher back
        kept = watcher.current
        store.answers.put_nowait(MapError("consul is down"))
        await watcher.wait_for_health(False, 2)
        assert watcher.current is kept and watcher.running
        assert await next_ask() == 1
        store.answers.put_nowait(RegionMap(placements={"e4": "shard-1"}, index=12))
        await watcher.wait_for(lambda m: "e4" in m.placements, 2)
        assert watcher.healthy
        assert [m.index for m in seen] == [10, 5, 0, 12]
    finally:
        await watcher.stop()
    assert not watcher.running


# --- ConsulMapStore on a real Consul agent ------------------------------------------------------

@pytest.fixture
async def store(consul_agent: ConsulAgent) -> AsyncIterator[ConsulMapStore]:
    s = ConsulMapStore(port=consul_agent.http_port, prefix=unique_prefix())
    yield s
    try:
        await s.delete_all()
    finally:
        await s.close()


async def test_round_trip_through_consul(store: ConsulMapStore, consul_agent: ConsulAgent) -> None:
    east = Region("east", "http://127.0.0.1:8081", "Virginia", {"west": 70})
    west = Region("west", "http://127.0.0.1:8082", "Oregon", {"east": 70})
    shards = [make_shard("shard-1", "east"), make_shard("shard-2", "west")]
    events = {str(uuid.uuid4()): "shard-1", str(uuid.uuid4()): "shard-2"}
    for region in (east, west):
        await store.put_region(region, 0)
    for shard in shards:
        await store.put_shard(shard, 0)
    for event, shard_name in events.items():
        await store.place_event(event, shard_name, 0)

    loaded = await store.load()
    assert loaded.regions == {"east": east, "west": west}
    assert loaded.shards == {s.name: s for s in shards}
    assert loaded.placements == events
    for event, shard_name in events.items():
        assert loaded.shard_for_event(event) == loaded.shards[shard_name]
        assert loaded.event_for_prefix(routing_prefix(new_booking_id(uuid.UUID(event)))) == event
    # every record's modify index is in the snapshot, and the map's index is the newest
    assert len(loaded.key_indexes) == 6 and loaded.index == max(loaded.key_indexes.values())
    shard, index = await store.read_shard("shard-2")
    assert shard == shards[1] and index == loaded.shard_index("shard-2")
    event = next(iter(events))
    assert await store.read_placement(event) == (events[event], loaded.placement_index(event))
    with pytest.raises(NotFound):
        await store.read_shard("shard-9")
    with pytest.raises(NotFound):
        await store.read_placement(str(uuid.uuid4()))

    # another prefix is another map
    other = ConsulMapStore(port=consul_agent.http_port, prefix=unique_prefix())
    try:
        empty = await other.load()
        assert (empty.regions, empty.shards, empty.placements) == ({}, {}, {})
    finally:
        await other.close()
    await store.delete_all()
    assert (await store.load()).placements == {}


async def test_writes_are_check_and_set_never_overwrites(store: ConsulMapStore) -> None:
    event = str(uuid.uuid4())
    await store.place_event(event, "shard-1", 0)
    await store.put_shard(make_shard(), 0)
    await store.put_region(Region("east", "http://x", "here"), 0)
    with pytest.raises(CasConflict) as lost:
        await store.place_event(event, "shard-2", 0)  # 0: must not exist yet
    assert lost.value.key == f"{store.prefix}placement/{event}" and lost.value.expected_index == 0
    with pytest.raises(CasConflict):
        await store.put_shard(make_shard(primary="west"), 0)
    with pytest.raises(CasConflict):
        await store.put_region(Region("east", "http://y", "there"), 0)

    before = await store.load()
    index = before.shard_index("shard-1")
    await store.put_shard(make_shard().with_primary("west"), index)
    with pytest.raises(CasConflict) as stale:
        await store.put_shard(make_shard(), index)  # written from a stale read
    assert stale.value.expected_index == index and "shard-1" in str(stale.value)
    after = await store.load()
    assert after.placements[event] == "shard-1"
    assert after.shards["shard-1"].primary_region == "west"
    assert after.regions["east"].gateway_url == "http://x"
    assert after.shard_index("shard-1") > index


async def test_two_writers_from_the_same_read_exactly_one_wins(
        store: ConsulMapStore, consul_agent: ConsulAgent) -> None:
    await store.put_shard(make_shard(regions=("east", "west", "south")), 0)
    rival = ConsulMapStore(port=consul_agent.http_port, prefix=store.prefix)  # a second operator
    try:
        for _round in range(5):
            shard, index = await store.read_shard("shard-1")
            target_a, target_b = sorted(set(shard.members) - {shard.primary_region})
            results = await asyncio.gather(
                store.put_shard(shard.with_primary(target_a), index),
                rival.put_shard(shard.with_primary(target_b), index),
                return_exceptions=True,
            )
            conflicts = [r for r in results if isinstance(r, CasConflict)]
            assert len(conflicts) == 1 and results.count(None) == 1, results
            assert conflicts[0].expected_index == index
            final, _ = await store.read_shard("shard-1")
            winner = target_a if results[0] is None else target_b
            assert final == shard.with_primary(winner)
            assert final.epoch == shard.epoch + 1  # one change of primary, one epoch
    finally:
        await rival.close()


async def test_rewriting_an_unchanged_record_still_takes_the_index(
        store: ConsulMapStore, consul_agent: ConsulAgent) -> None:
    """Consul acknowledges an identical write without bumping ModifyIndex; our writes
    must still let only one of two writers from the same read win."""
    await store.put_shard(make_shard(), 0)
    rival = ConsulMapStore(port=consul_agent.http_port, prefix=store.prefix)
    try:
        for _round in range(5):
            shard, index = await store.read_shard("shard-1")
            changed = shard.with_sync_standbys(() if shard.sync_standbys else ("west",))
            results = await asyncio.gather(
                store.put_shard(shard, index),  # "promote the current primary": no change
                rival.put_shard(changed, index),
                return_exceptions=True,
            )
            assert results.count(None) == 1, results
            assert isinstance(results[0] if results[1] is None else results[1], CasConflict)
            after, after_index = await store.read_shard("shard-1")
            assert after_index > index
            assert after == (shard if results[0] is None else changed)
    finally:
        await rival.close()


async def test_update_shard_under_contention_applies_every_change_exactly_once(
        store: ConsulMapStore, consul_agent: ConsulAgent) -> None:
    await store.put_shard(make_shard(), 0)
    updaters = 12
    stores = [ConsulMapStore(port=consul_agent.http_port, prefix=store.prefix) for _ in range(3)]

    def add_member(n: int) -> Callable[[Shard], Shard]:
        def change(shard: Shard) -> Shard:
            member = ShardMember(f"r{n}", f"http://127.0.0.1:1/r{n}", f"127.0.0.1:{6000 + n}")
            return replace(shard, members={**shard.members, member.region: member})
        return change

    try:
        written = await asyncio.gather(*(
            stores[n % len(stores)].update_shard("shard-1", add_member(n)) for n in range(updaters)
        ))
    finally:
        for s in stores:
            await s.close()
    final, _ = await store.read_shard("shard-1")
    assert final.epoch == 1  # no change of primary
    assert set(final.members) == {"east", "west"} | {f"r{n}" for n in range(updaters)}
    assert sorted(len(s.members) for s in written) == list(range(3, 3 + updaters))  # each once


async def test_move_event_is_check_and_set_on_its_placement(store: ConsulMapStore) -> None:
    event = str(uuid.uuid4())
    await store.put_shard(make_shard("shard-1"), 0)
    await store.put_shard(make_shard("shard-2", "west"), 0)
    await store.place_event(event, "shard-1", 0)
    index = (await store.load()).placement_index(event)
    await store.move_event(event, "shard-2", index)
    moved = await store.load()
    assert moved.shard_for_event(event) == moved.shards["shard-2"]
    with pytest.raises(CasConflict):
        await store.move_event(event, "shard-1", index)  # a second operator, from the old read
    with pytest.raises(NotFound):
        await store.move_event(event, "shard-9", moved.placement_index(event))
    with pytest.raises(NotFound):
        await store.move_event(str(uuid.uuid4()), "shard-1", index)
    with pytest.raises(ValueError):
        await store.move_event(event, "shard-1", 0)
    assert (await store.load()).placements[event] == "shard-2"


async def test_unplace_event_is_check_and_set_on_its_placement(store: ConsulMapStore) -> None:
    event = str(uuid.uuid4())
    await store.put_shard(make_shard("shard-1"), 0)
    await store.place_event(event, "shard-1", 0)
    _, index = await store.read_placement(event)
    await store.place_event(event, "shard-1", index)  # someone re-placed it since our read
    with pytest.raises(CasConflict):
        await store.unplace_event(event, index)
    assert (await store.load()).placements[event] == "shard-1"
    _, index = await store.read_placement(event)
    await store.unplace_event(event, index)
    with pytest.raises(NotFound):
        await store.read_placement(event)
    await store.unplace_event(event, index)  # already gone: nothing to do (Consul's answer too)
    with pytest.raises(NotFound):
        await store.read_placement(event)
    with pytest.raises(ValueError):
        await store.unplace_event(event, 0)


async def test_service_registry_lists_only_healthy_instances(store: ConsulMapStore) -> None:
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/api/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    service = f"svc-{uuid.uuid4().hex[:8]}"
    instance = f"{service}-east"

    async def until(condition: Callable[[list[ServiceInstance]], bool]) -> list[ServiceInstance]:
        index = 0
        async with asyncio.timeout(15):  # a blocking query wakes at every health change
            while True:
                index, instances = await store.watch_healthy_instances(service, index, 5)
                if condition(instances):
                    return instances

    try:
        await store.register_service(service, instance, "127.0.0.1", port, ["region=east"],
                                     f"http://127.0.0.1:{port}/api/health")
        healthy = await until(lambda found: len(found) == 1)
        assert healthy == [ServiceInstance(service, instance, "127.0.0.1", port, ("region=east",))]
        assert await store.healthy_instances(service) == healthy
        await runner.cleanup()  # the instance dies: its check goes critical
        await until(lambda found: found == [])
    finally:
        await runner.cleanup()
        await store.deregister_service(instance)
        await store.deregister_service(instance)  # idempotent
    assert await store.healthy_instances(service) == []


async def test_health_watcher_follows_an_instance_failing_and_recovering(
        store: ConsulMapStore) -> None:
    """`watch_instances` lists registered instances passing or not; the `HealthWatcher`
    built on it flips as the instance's HTTP check fails and passes again."""
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def serve(port: int) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/api/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    port = free_port()
    url = f"http://127.0.0.1:{port}/shards/s1"
    service = f"svc-{uuid.uuid4().hex[:8]}"
    instance = f"{service}-east-s1"
    watcher = HealthWatcher(store, service)
    runner = await serve(port)
    try:
        await watcher.start()
        assert not watcher.failing(url)  # unknown to the registry: not held against it
        await store.register_service(service, instance, "127.0.0.1", port, ["region=east"],
                                     f"http://127.0.0.1:{port}/api/health", url=url)
        # The first check runs at once, then every second.
        await watcher.wait_for(lambda found: [i.passing for i in found] == [True], 15)
        await runner.cleanup()  # the instance dies: its check goes critical
        await watcher.wait_until(url, failing=True, timeout=15)
        assert not watcher.failing(f"http://127.0.0.1:{port}/shards/s2")  # another URL
        _, listed = await store.watch_instances(service, 0)
        assert [(i.instance_id, i.passing, i.url) for i in listed] == [(instance, False, url)]
        assert await store.healthy_instances(service) == []
        runner = await serve(port)  # back
        await watcher.wait_until(url, failing=False, timeout=15)
        assert [i.passing for i in watcher.instances] == [True]
    finally:
        await watcher.stop()
        await runner.cleanup()
        await store.deregister_service(instance)


async def test_calls_time_out_instead_of_hanging() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # hold the connection open without a response

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    silent = ConsulMapStore(port=port, prefix=unique_prefix(), timeout=0.3)
    refused = ConsulMapStore(port=free_port(), prefix=unique_prefix(), timeout=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(MapError):
            await silent.load()
        with pytest.raises(MapError):
            await silent.put_shard(make_shard(), 0)
        with pytest.raises(MapError):
            await silent.watch(7, wait_seconds=0.1)
        assert time.monotonic() - started < 3
        with pytest.raises(MapError):
            await refused.load()
    finally:
        await silent.close()
        await refused.close()
        server.close()
        await server.wait_closed()


async def test_a_watcher_started_without_consul_starts_empty_and_keeps_trying() -> None:
    watcher = MapWatcher(ConsulMapStore(port=free_port(), prefix=unique_prefix(), timeout=0.3))
    started = time.monotonic()
    await watcher.start(first_load_timeout=0.5)  # bounded: a gateway still comes up
    try:
        assert time.monotonic() - started < 2
        await watcher.wait_for_health(False, timeout=2)
        assert watcher.current is None and watcher.running
    finally:
        await watcher.stop()
        await watcher.store.close()


async def test_watchers_see_a_change_without_waiting_out_their_blocking_query(
        store: ConsulMapStore, consul_agent: ConsulAgent) -> None:
    """A change wakes each watcher's blocking query: every change is seen well inside the
    5 s the test waits, while the watchers' queries block for 30 s (so seeing it is not a
    query timing out and polling again). The delays are printed, not asserted."""
    await store.put_shard(make_shard(), 0)
    await store.put_shard(make_shard("shard-2", "west"), 0)
    # two gateways, each with its own connection to Consul
    gateway_stores = [ConsulMapStore(port=consul_agent.http_port, prefix=store.prefix) for _ in range(2)]
    watchers = [MapWatcher(s, wait_seconds=30) for s in gateway_stores]
    heard: list[RegionMap] = []
    watchers[0].add_listener(heard.append)
    for w in watchers:
        await w.start()
    delays: list[float] = []
    try:
        for w in watchers:
            assert w.current is not None and set(w.current.shards) == {"shard-1", "shard-2"}
        for _ in range(5):
            event = str(uuid.uuid4())
            written = time.monotonic()
            await store.place_event(event, "shard-1", 0)
            for w in watchers:
                seen = await w.wait_for(lambda m, e=event: e in m.placements, timeout=5)
                delays.append(time.monotonic() - written)
                assert seen.shard_for_event(event) == seen.shards["shard-1"]
        index = watchers[0].current.placement_index(event)  # type: ignore[union-attr]
        written = time.monotonic()
        await store.move_event(event, "shard-2", index)
        for w in watchers:
            await w.wait_for(lambda m, e=event: m.placements.get(e) == "shard-2", timeout=5)
            delays.append(time.monotonic() - written)
        written = time.monotonic()
        await store.update_shard("shard-2", lambda s: s.with_primary("east"))
        for w in watchers:
            await w.wait_for(lambda m: m.shards["shard-2"].epoch == 2, timeout=5)
            delays.append(time.monotonic() - written)
    finally:
        for w in watchers:
            await w.stop()
        for s in gateway_stores:
            await s.close()
    print(f"watchers saw each change after {min(delays) * 1000:.1f}-{max(delays) * 1000:.1f} ms")
    assert heard[-1].shards["shard-2"].primary_region == "east"
    assert len(heard) >= 3


# --- last: Consul goes away and comes back ----------------------------------------------------------

async def test_watcher_keeps_the_last_map_while_consul_is_down(
        store: ConsulMapStore, consul_agent: ConsulAgent) -> None:
    event = str(uuid.uuid4())
    await store.put_shard(make_shard(), 0)
    await store.place_event(event, "shard-1", 0)
    watcher = MapWatcher(store, wait_seconds=5)
    await watcher.start()
    try:
        before = await watcher.wait_for(lambda m: event in m.placements, timeout=5)
        try:
            consul_agent.stop()
            await watcher.wait_for_health(False, timeout=10)
            with pytest.raises(MapError):
                await store.load()
            # While it is down the watcher keeps retrying and keeps the map it had.
            with pytest.raises(TimeoutError):
                await watcher.wait_for(lambda m: m is not before, timeout=2.5)
            assert watcher.current is before and watcher.running and not watcher.healthy
            assert watcher.current.shard_for_event(event) == make_shard()
        finally:
            if not consul_agent.running():
                # On this thread: the agent dies with the thread that started it (PDEATHSIG).
                consul_agent.start()
        restarted = time.monotonic()
        later = str(uuid.uuid4())
        await store.place_event(later, "shard-1", 0)
        after = await watcher.wait_for(lambda m: later in m.placements, timeout=10)
        recovered = time.monotonic() - restarted
        print(f"watcher had the new placement {recovered * 1000:.0f} ms after consul was back")
        assert event in after.placements and watcher.healthy
    finally:
        await watcher.stop()


def test_moved_since_lsn_is_the_latest_move_onto_each_shard() -> None:
    """A copy of a shard serves reads once it has replayed the latest move onto it
    (gateway `_wanted_position`): the highest sinceLsn of the events placed there, by
    position, not by text; a malformed one is ignored."""
    region_map = RegionMap(
        placements={"e1": "shard-1", "e2": "shard-1", "e3": "shard-2", "e4": "shard-2", "e5": "shard-3"},
        placement_lsns={"e1": "0/9FFFFFF", "e2": "0/10000000", "e3": "1/0", "e4": "bogus"},
    )
    assert region_map.moved_since_lsn("shard-1") == "0/10000000"
    assert region_map.moved_since_lsn("shard-2") == "1/0"
    assert region_map.moved_since_lsn("shard-3") is None
    assert region_map.placement("e2") == Placement("e2", "shard-1", "0/10000000")
