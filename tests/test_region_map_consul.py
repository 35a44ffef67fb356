"""The region map on a real Consul agent: round trips, check-and-set, watching."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from deploy.consul_agent import ConsulAgent
from region_map import (
    CasConflict,
    ConsulMapStore,
    MapWatcher,
    Region,
    RegionMap,
    Shard,
    ShardMember,
)


def make_shard(name: str = "shard-1", primary: str = "east") -> Shard:
    return Shard(name, 1, primary, {
        r: ShardMember(r, f"http://127.0.0.1:1/{r}/{name}", f"127.0.0.1:{5400 + n}")
        for n, r in enumerate(("east", "west"))
    })


@pytest.fixture
async def store(consul_agent: ConsulAgent) -> AsyncIterator[ConsulMapStore]:
    s = ConsulMapStore(port=consul_agent.http_port, prefix=f"test-{uuid.uuid4().hex[:8]}/")
    yield s
    try:
        await s.delete_all()
    finally:
        await s.close()


async def test_round_trip(store: ConsulMapStore) -> None:
    region = Region("east", "http://127.0.0.1:8081", "Virginia", {"west": 40})
    shard = make_shard()
    event = str(uuid.uuid4())
    await store.put_region(region, 0)
    await store.put_shard(shard, 0)
    await store.place_event(event, "shard-1", 0)
    loaded = await store.load()
    assert loaded.regions == {"east": region}
    assert loaded.shards == {"shard-1": shard}
    assert loaded.placements == {event: "shard-1"}
    assert loaded.shard_for_event(event) == shard
    assert loaded.index > 0


async def test_create_twice_is_a_conflict_not_an_overwrite(store: ConsulMapStore) -> None:
    event = str(uuid.uuid4())
    await store.place_event(event, "shard-1", 0)
    with pytest.raises(CasConflict):
        await store.place_event(event, "shard-2", 0)
    assert (await store.load()).placements[event] == "shard-1"


async def test_two_writers_from_the_same_read_exactly_one_wins(store: ConsulMapStore) -> None:
    await store.put_shard(make_shard(), 0)
    shard, index = await store.read_shard("shard-1")
    results = await asyncio.gather(
        store.put_shard(shard.with_primary("west"), index),
        store.put_shard(replace(shard, epoch=shard.epoch + 5), index),
        return_exceptions=True,
    )
    conflicts = [r for r in results if isinstance(r, CasConflict)]
    assert len(conflicts) == 1, results
    assert "shard-1" in str(conflicts[0])
    final, _ = await store.read_shard("shard-1")
    winner = 0 if results[0] is None else 1
    assert final == (shard.with_primary("west") if winner == 0 else replace(shard, epoch=6))


async def test_update_shard_applies_every_concurrent_change_once(store: ConsulMapStore) -> None:
    await store.put_shard(make_shard(), 0)
    await asyncio.gather(*(
        store.update_shard("shard-1", lambda s: replace(s, epoch=s.epoch + 1), attempts=50)
        for _ in range(10)
    ))
    final, _ = await store.read_shard("shard-1")
    assert final.epoch == 11


async def test_watcher_sees_a_change_within_a_second(store: ConsulMapStore) -> None:
    await store.put_shard(make_shard(), 0)
    watcher = MapWatcher(store)
    await watcher.start()
    try:
        assert watcher.current is not None and "shard-1" in watcher.current.shards
        event = str(uuid.uuid4())
        written = time.monotonic()
        await store.place_event(event, "shard-1", 0)
        seen = await watcher.wait_for(lambda m: event in m.placements, timeout=5)
        delay = time.monotonic() - written
        print(f"watcher saw the placement after {delay * 1000:.0f} ms")
        assert seen.shard_for_event(event) is not None
        assert delay < 1.0
    finally:
        await watcher.stop()


async def test_watcher_keeps_the_last_map_while_consul_is_down(
        store: ConsulMapStore, consul_agent: ConsulAgent) -> None:
    event = str(uuid.uuid4())
    await store.put_shard(make_shard(), 0)
    await store.place_event(event, "shard-1", 0)
    watcher = MapWatcher(store, wait_seconds=2)
    await watcher.start()
    try:
        before = watcher.current
        assert before is not None and event in before.placements
        consul_agent.stop()
        try:
            # The watcher notices (its next blocking query fails) and keeps its map.
            deadline = time.monotonic() + 10
            while watcher.healthy:
                assert time.monotonic() < deadline, "watcher never noticed consul was down"
                await asyncio.sleep(0.05)  # poll interval
            assert watcher.current is before
        finally:
            consul_agent.start()
        later = str(uuid.uuid4())
        await store.place_event(later, "shard-1", 0)
        after = await watcher.wait_for(lambda m: later in m.placements, timeout=10)
        assert event in after.placements and watcher.healthy
    finally:
        await watcher.stop()


def test_model_json_round_trip_and_epoch_growth() -> None:
    shard = make_shard()
    assert Shard.from_json(shard.to_json()) == shard
    promoted = shard.with_primary("west")
    assert promoted.epoch == shard.epoch + 1 and promoted.primary.region == "west"
    assert promoted.replica_in("east") is not None and promoted.replica_in("west") is None
    with pytest.raises(ValueError):
        shard.with_primary("mars")
    region = Region("east", "http://x", "here", {"west": 40, "south": 90})
    assert Region.from_json(region.to_json()) == region
    assert region.nearest(["south", "west", "east"]) == ["east", "west", "south"]


def test_booking_prefix_resolves_to_its_event() -> None:
    from common.ids import new_booking_id, routing_prefix

    events = [str(uuid.uuid4()) for _ in range(50)]
    region_map = RegionMap(placements={e: "shard-1" for e in events})
    for event in events:
        booking = new_booking_id(uuid.UUID(event))
        assert region_map.event_for_prefix(routing_prefix(booking)) == event
    assert region_map.event_for_prefix(routing_prefix(uuid.uuid4())) is None
