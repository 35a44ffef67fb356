"""The map's failover foundation: the shard record's synchronous set and epoch LSN,
the epoch rules the store enforces, operation journals and session locks.

The model tests are pure; the rest run on the real Consul agent of the harness,
each under its own KV prefix. Nothing sleeps to synchronise: takeovers are
polled for with a deadline, blocking queries wait on Consul itself.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from deploy.consul_agent import ConsulAgent
from region_map import (
    CasConflict,
    ConsulMapStore,
    EpochRuleViolation,
    MapError,
    MapWatcher,
    NotFound,
    RegionMap,
    SessionGone,
    Shard,
    ShardMember,
    check_epoch_rules,
    ops_prefix_for,
)


def make_shard(name: str = "shard-1", primary: str = "east",
               regions: tuple[str, ...] = ("east", "west", "south"), epoch: int = 1) -> Shard:
    return Shard(name, epoch, primary, {
        r: ShardMember(r, f"http://127.0.0.1:1/{r}/shards/{name}", f"127.0.0.1:{5400 + n}")
        for n, r in enumerate(regions)
    })


def unique_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}/"


# --- the shard record, pure ----------------------------------------------------------------

def test_new_fields_round_trip_in_camel_case_and_old_records_load_with_defaults() -> None:
    shard = replace(make_shard(), sync_standbys=("west",), epoch_lsn="0/3000060", sync_mode="region")
    doc = shard.to_json()
    assert (doc["syncStandbys"], doc["epochLsn"], doc["syncMode"]) == (["west"], "0/3000060", "region")
    assert Shard.from_json(json.loads(json.dumps(doc))) == shard
    old = {k: v for k, v in make_shard().to_json().items()
           if k not in ("syncStandbys", "epochLsn", "syncMode")}
    loaded = Shard.from_json(old)
    assert (loaded.sync_standbys, loaded.epoch_lsn, loaded.sync_mode) == ((), None, "zone")
    assert loaded == make_shard()


def test_invalid_synchronous_settings_are_refused() -> None:
    shard = make_shard()
    for bad in ({"sync_mode": "quorum"}, {"sync_standbys": ("mars",)},
                {"sync_standbys": ("east",)},  # the primary is not its own standby
                {"sync_standbys": "west"}, {"epoch_lsn": "3000060"}, {"epoch_lsn": "0/xyz"}):
        with pytest.raises(ValueError):
            replace(shard, **bad)  # type: ignore[arg-type]
    # the set is a set: order and repeats do not make another record
    assert replace(shard, sync_standbys=("west", "south", "west")) == replace(
        shard, sync_standbys=("south", "west"))


def test_promoted_and_with_primary_start_a_new_epoch() -> None:
    shard = replace(make_shard(), sync_standbys=("west", "south"), epoch_lsn="0/1000000")
    promoted = shard.promoted("west", "0/5000A28", ["south"])
    assert (promoted.primary_region, promoted.epoch) == ("west", 2)
    assert (promoted.epoch_lsn, promoted.sync_standbys) == ("0/5000A28", ("south",))
    with pytest.raises(ValueError):
        shard.promoted("east", "0/5000A28", ())  # the primary already
    with pytest.raises(ValueError):
        shard.promoted("mars", "0/5000A28", ())
    # with_primary: a new epoch whose start and synchronous set are not known yet
    moved = shard.with_primary("south")
    assert (moved.primary_region, moved.epoch, moved.epoch_lsn, moved.sync_standbys) == (
        "south", 2, None, ())
    assert shard.with_primary("east") is shard
    kept = promoted.with_sync_standbys(["east", "south"])
    assert (kept.epoch, kept.primary_region, kept.sync_standbys) == (2, "west", ("east", "south"))


@pytest.mark.parametrize(("stored", "offered", "allowed"), [
    (None, ("east", 1), True),
    (None, ("east", 7), True),
    (None, ("east", 0), False),
    (("east", 3), ("west", 4), True),  # change of primary, epoch + 1
    (("east", 3), ("east", 3), True),  # same primary, same epoch (members, sync set...)
    (("east", 3), ("west", 5), False),  # epoch + 2
    (("east", 3), ("west", 3), False),  # change of primary without a new epoch
    (("east", 3), ("west", 2), False),  # lower
    (("east", 3), ("east", 4), False),  # a new epoch without a change of primary
    (("east", 3), ("east", 2), False),
])
def test_epoch_rules(stored: tuple[str, int] | None, offered: tuple[str, int], allowed: bool) -> None:
    before = None if stored is None else make_shard(primary=stored[0], epoch=stored[1])
    after = make_shard(primary=offered[0], epoch=offered[1])
    if allowed:
        check_epoch_rules(before, after)
    else:
        with pytest.raises(EpochRuleViolation) as refused:
            check_epoch_rules(before, after)
        assert "shard-1" in str(refused.value) and f"epoch {offered[1]}" in str(refused.value)
        assert refused.value.offered == (offered[1], offered[0])
        if stored is not None:
            assert refused.value.stored == (stored[1], stored[0])


def test_the_ops_prefix_is_a_sibling_of_the_map_prefix() -> None:
    assert ops_prefix_for("boxoffice/") == "boxoffice-ops/"
    assert not ops_prefix_for("boxoffice/").startswith("boxoffice/")
    with pytest.raises(ValueError):
        ConsulMapStore(prefix="boxoffice/", ops_prefix="boxoffice/ops/")  # watchers would see it


# --- the epoch rules on Consul ---------------------------------------------------------------

@pytest.fixture
async def store(consul_agent: ConsulAgent) -> AsyncIterator[ConsulMapStore]:
    s = ConsulMapStore(port=consul_agent.http_port, prefix=unique_prefix())
    yield s
    try:
        await s.delete_all()
    finally:
        await s.close()


@pytest.fixture
async def rival(store: ConsulMapStore, consul_agent: ConsulAgent) -> AsyncIterator[ConsulMapStore]:
    """A second writer (its own client and connection) on the same map."""
    s = ConsulMapStore(port=consul_agent.http_port, prefix=store.prefix)
    yield s
    await s.close()


async def test_two_promotions_from_one_read_one_wins_with_epoch_plus_one(
        store: ConsulMapStore, rival: ConsulMapStore) -> None:
    await store.put_shard(make_shard(), 0)
    for _round in range(5):
        shard, index = await store.read_shard("shard-1")
        targets = [r for r in ("east", "west", "south") if r != shard.primary_region]
        offers = [shard.promoted(targets[0], "0/1000028", ()), shard.promoted(targets[1], "0/1000028", ())]
        results = await asyncio.gather(store.put_shard(offers[0], index),
                                       rival.put_shard(offers[1], index), return_exceptions=True)
        assert results.count(None) == 1, results
        lost = results[0] if results[1] is None else results[1]
        assert isinstance(lost, CasConflict) and lost.expected_index == index
        final, final_index = await store.read_shard("shard-1")
        assert final == offers[results.index(None)]
        assert final.epoch == shard.epoch + 1 and final_index > index


@pytest.mark.parametrize("offer", ["epoch+2", "epoch-1", "new primary, same epoch",
                                   "same primary, epoch+1"])
async def test_the_store_refuses_what_breaks_the_epoch_rules_and_writes_nothing(
        store: ConsulMapStore, offer: str) -> None:
    await store.put_shard(make_shard(epoch=4), 0)
    shard, index = await store.read_shard("shard-1")
    bad = {
        "epoch+2": replace(shard, primary_copy="west", epoch=6),
        "epoch-1": replace(shard, primary_copy="west", epoch=3),
        "new primary, same epoch": replace(shard, primary_copy="west"),
        "same primary, epoch+1": replace(shard, epoch=5),
    }[offer]
    with pytest.raises(EpochRuleViolation) as refused:
        await store.put_shard(bad, index)
    message = str(refused.value)
    assert "shard-1" in message and "epoch 4, primary east" in message
    assert f"epoch {bad.epoch} with primary {bad.primary_region}" in message
    with pytest.raises(EpochRuleViolation):
        await store.update_shard("shard-1", lambda _s: bad)  # the loop goes through the rules
    assert await store.read_shard("shard-1") == (shard, index)  # nothing was written


async def test_the_rules_are_checked_against_the_record_the_index_names(
        store: ConsulMapStore, rival: ConsulMapStore) -> None:
    await store.put_shard(make_shard(), 0)
    shard, index = await store.read_shard("shard-1")
    await rival.put_shard(shard.with_primary("west"), index)  # epoch 2, west
    current, _ = await store.read_shard("shard-1")
    # Valid against the current record (west, 2 -> south, 3), but offered on the old
    # index: a lost check-and-set, never a write judged against another record.
    with pytest.raises(CasConflict):
        await store.put_shard(current.with_primary("south"), index)
    # Valid against the old record, but that is no longer the stored one.
    with pytest.raises(CasConflict):
        await store.put_shard(shard.with_primary("south"), index)
    with pytest.raises(CasConflict):
        await store.put_shard(make_shard("shard-9"), index)  # no such record at any index
    assert (await store.read_shard("shard-1"))[0] == current


async def test_creating_a_shard_needs_epoch_one_or_more(store: ConsulMapStore) -> None:
    with pytest.raises(EpochRuleViolation):
        await store.put_shard(make_shard(epoch=0), 0)
    with pytest.raises(NotFound):
        await store.read_shard("shard-1")
    await store.put_shard(make_shard(epoch=7), 0)  # an existing cluster's epoch carries on
    assert (await store.read_shard("shard-1"))[0].epoch == 7


async def test_a_record_written_before_the_new_fields_loads_and_can_be_promoted(
        store: ConsulMapStore) -> None:
    old = {k: v for k, v in make_shard().to_json().items()
           if k not in ("syncStandbys", "epochLsn", "syncMode")}
    assert await store.client.kv.put(store.prefix + "shards/shard-1", json.dumps(old), cas=0)
    loaded = (await store.load()).shards["shard-1"]
    assert (loaded.sync_standbys, loaded.epoch_lsn, loaded.sync_mode) == ((), None, "zone")
    promoted = await store.update_shard("shard-1", lambda s: s.promoted("west", "0/2000000", ["south"]))
    assert (await store.read_shard("shard-1"))[0] == promoted
    assert (promoted.epoch, promoted.sync_standbys) == (2, ("south",))


# --- operation journals --------------------------------------------------------------------

async def test_journals_are_check_and_set(store: ConsulMapStore, rival: ConsulMapStore) -> None:
    op = f"promote-shard-1-{uuid.uuid4().hex[:8]}"
    with pytest.raises(NotFound):
        await store.read_journal(op)
    first = await store.put_journal(op, {"step": "picked", "to": "west"}, 0)
    assert await store.read_journal(op) == ({"step": "picked", "to": "west"}, first)
    with pytest.raises(CasConflict):
        await rival.put_journal(op, {"step": "picked", "to": "south"}, 0)  # exists already
    # two runners from one read, even with identical documents: exactly one wins
    results = await asyncio.gather(store.put_journal(op, {"step": "repointed"}, first),
                                   rival.put_journal(op, {"step": "repointed"}, first),
                                   return_exceptions=True)
    won = [r for r in results if isinstance(r, int)]
    assert len(won) == 1 and won[0] > first
    assert isinstance(results[0] if results[1] == won[0] else results[1], CasConflict)
    doc, second = await store.read_journal(op)
    assert (doc, second) == ({"step": "repointed"}, won[0])
    with pytest.raises(CasConflict):
        await store.put_journal(op, {"step": "committed"}, first)  # stale
    other = f"move-{uuid.uuid4().hex[:8]}"
    await store.put_journal(other, {"step": "copying"}, 0)
    assert set(await store.list_journals()) == {op, other}
    assert await store.list_journals("promote-") == {op: ({"step": "repointed"}, second)}
    assert await store.list_journals("switchover-") == {}
    with pytest.raises(CasConflict):
        await store.delete_journal(op, first)
    await store.delete_journal(op, second)
    with pytest.raises(NotFound):
        await store.read_journal(op)
    await store.delete_journal(op, second)  # already gone stays gone


async def test_journal_and_lock_writes_do_not_wake_map_watchers(
        store: ConsulMapStore, consul_agent: ConsulAgent) -> None:
    await store.put_shard(make_shard(), 0)
    gateway_store = ConsulMapStore(port=consul_agent.http_port, prefix=store.prefix)
    watcher = MapWatcher(gateway_store)
    heard: list[RegionMap] = []
    watcher.add_listener(heard.append)
    await watcher.start()
    session = await store.create_session("test-controller", 10)
    try:
        assert watcher.current is not None and "shard-1" in watcher.current.shards
        index = watcher.current.index
        op = f"promote-{uuid.uuid4().hex[:8]}"
        at = await store.put_journal(op, {"step": "picked"}, 0)
        await store.put_journal(op, {"step": "committed"}, at)
        assert await store.acquire_lock("failover-controller", session, {"region": "east"})
        # A gateway's own query, blocked on the map's index, is not woken by any of it.
        unchanged = await gateway_store.watch(index, 0.5)
        assert unchanged.index == index
        shard, shard_index = await store.read_shard("shard-1")
        await store.put_shard(shard.with_primary("west"), shard_index)
        await watcher.wait_for(lambda m: m.shards["shard-1"].primary_region == "west", 5)
        assert [m.index for m in heard] == [index, watcher.current.index]  # one change heard
    finally:
        await store.destroy_session(session)
        await watcher.stop()
        await gateway_store.close()


# --- sessions and the leader lock ----------------------------------------------------------

LOCK = "failover-controller"


async def wait_for_takeover(store: ConsulMapStore, session: str, deadline: float) -> float:
    """Poll `acquire_lock` until `session` gets the lock; seconds it took."""
    started = time.monotonic()
    while not await store.acquire_lock(LOCK, session, {"region": "west"}):
        assert time.monotonic() - started < deadline, f"no takeover within {deadline} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_only_one_contender_holds_the_lock(store: ConsulMapStore, rival: ConsulMapStore) -> None:
    a = await store.create_session("controller-east", 10)
    b = await rival.create_session("controller-west", 10)
    try:
        assert (await store.lock_holder(LOCK))[:2] == (None, None)
        results = await asyncio.gather(store.acquire_lock(LOCK, a, {"region": "east"}),
                                       rival.acquire_lock(LOCK, b, {"region": "west"}))
        assert sorted(results) == [False, True]
        holder, loser = (a, b) if results[0] else (b, a)
        holder_store, loser_store = (store, rival) if results[0] else (rival, store)
        state = await store.lock_holder(LOCK)
        assert state.session == holder and state.value in ({"region": "east"}, {"region": "west"})
        assert not await loser_store.acquire_lock(LOCK, loser, {"region": "again"})
        assert not await loser_store.release_lock(LOCK, loser)  # not the holder's to release
        assert await holder_store.acquire_lock(LOCK, holder, {"region": "x", "step": 2})  # re-take
        assert (await store.lock_holder(LOCK)).value == {"region": "x", "step": 2}
        assert await holder_store.release_lock(LOCK, holder)
        released = await store.lock_holder(LOCK)
        assert released.session is None and released.value == {"region": "x", "step": 2}
        assert await loser_store.acquire_lock(LOCK, loser, {"region": "next"})
    finally:
        await store.destroy_session(a)
        await rival.destroy_session(b)


async def test_a_destroyed_holder_hands_over_at_once(store: ConsulMapStore, rival: ConsulMapStore) -> None:
    a = await store.create_session("controller-east", 10)
    b = await rival.create_session("controller-west", 10)
    try:
        assert await store.acquire_lock(LOCK, a, {"region": "east"})
        held = await rival.lock_holder(LOCK)
        waiting = asyncio.create_task(rival.watch_lock(LOCK, held.watch_index, 10))
        await store.destroy_session(a)
        freed = await asyncio.wait_for(waiting, 10)  # the blocking query wakes at the release
        assert freed.session is None and freed.watch_index > held.watch_index
        # no lock delay: the other contender takes it on its first try
        assert await rival.acquire_lock(LOCK, b, {"region": "west"})
        assert not await store.renew_session(a)
        with pytest.raises(SessionGone):
            await store.acquire_lock(LOCK, a, {"region": "east"})
        await store.destroy_session(a)  # idempotent
    finally:
        await rival.destroy_session(b)


async def test_a_holder_that_stops_renewing_loses_the_lock_by_its_ttl(
        store: ConsulMapStore, rival: ConsulMapStore) -> None:
    a = await store.create_session("controller-east", 1)
    b = await rival.create_session("controller-west", 10)
    try:
        assert await store.acquire_lock(LOCK, a, {"region": "east"})
        took = await wait_for_takeover(rival, b, deadline=6)  # Consul expires at 1-2 x TTL
        print(f"a 1 s session expired and its lock was taken over after {took:.2f} s")
        assert (await rival.lock_holder(LOCK)).session == b
        assert not await store.renew_session(a)
    finally:
        await store.destroy_session(a)
        await rival.destroy_session(b)


async def test_renewing_keeps_the_lock(store: ConsulMapStore, rival: ConsulMapStore) -> None:
    a = await store.create_session("controller-east", 1)
    b = await rival.create_session("controller-west", 10)
    try:
        assert await store.acquire_lock(LOCK, a, {"region": "east"})
        until = time.monotonic() + 3.5  # well past the 2 s an unrenewed 1 s session lasts
        while time.monotonic() < until:
            assert await store.renew_session(a)
            assert not await rival.acquire_lock(LOCK, b, {"region": "west"})
            await asyncio.sleep(0.25)  # the renewal period (a quarter of the TTL)
        assert (await rival.lock_holder(LOCK)).session == a
    finally:
        await store.destroy_session(a)
        await rival.destroy_session(b)


async def test_the_agent_accepts_one_second_sessions_and_no_shorter(store: ConsulMapStore) -> None:
    session = await store.create_session("short", 1)  # Consul's default floor is 10 s
    await store.destroy_session(session)
    with pytest.raises(MapError):
        await store.create_session("too-short", 0.5)
