"""Issue 16, pure logic on plain fakes (no cluster):

- class 7: an observer judges the age of a transition or of an abandoned move's journal
  by its own monotonic clock, from when it first saw it, never by the wall time the
  writer put in it (`since`, `updatedAt`), whatever that writer's clock said;
- class 1: the controller overtakes a committed promotion whose target is lost, choosing
  among the copies that held every confirmed booking before it;
- failover stays home: among the synchronous standbys that answer, the controller picks
  the old primary's region's copy even when another region's copy reports a higher
  received position right after the primary died (the promotion's catch-up step brings
  the candidate up to any listed standby ahead of it), another region's copy only when
  no home copy qualifies, and it says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from common.observed import FirstSeen
from event_ops.abandoned import abandoned_moves
from failover.agents import AgentUnreachable, CopyStatus
from failover.controller import Controller, Settings, Suspect, choose_candidate, standbys_lost_primary
from failover.promote import effective_timelines
from gateway.ride_through import RideThrough
from region_map import LockState, NotFound, RegionMap, ServiceInstance, Shard, ShardMember
from region_map.model import Transition


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wall(seconds_from_now: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds_from_now)).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def member(region: str, zone: str = "a", port: int = 5000) -> ShardMember:
    return ShardMember(region, f"http://svc/{region}/{zone}", f"127.0.0.1:{port}", zone)


def two_region_shard(transition: Transition | None = None) -> Shard:
    """Primary east; zone standby east/b; west and west/b in the other region. Sync zone:
    FIRST 1 (east/b, west, west/b)."""
    return Shard("c-east", 3, "east",
                 {"east": member("east", port=5001), "east/b": member("east", "b", 5002),
                  "west": member("west", port=5003), "west/b": member("west", "b", 5004)},
                 sync_standbys=("east/b", "west", "west/b"), sync_mode="zone", transition=transition)


class FakeWatcher:
    def __init__(self) -> None:
        self.current: RegionMap | None = RegionMap()

    async def wait_for(self, predicate: Callable[[RegionMap], bool], timeout: float) -> RegionMap:
        raise TimeoutError


# --- class 7: transitions --------------------------------------------------------------------

def test_a_transition_whose_writer_clock_is_behind_is_held_as_a_fresh_one() -> None:
    """`since` two hours in the past (the switchover runner's clock is behind, or the
    gateway's ahead): the gateway sees it for the first time now, so it is fresh."""
    ride = RideThrough(FakeWatcher(), stale_transition_seconds=30)
    record = two_region_shard(Transition("switchover", "east/b", wall(-7200), 3))
    assert ride.in_transition(record)


def test_a_transition_is_judged_by_the_observers_own_clock() -> None:
    clock = Clock()
    ride = RideThrough(FakeWatcher(), stale_transition_seconds=30, clock=clock)
    future = two_region_shard(Transition("switchover", "east/b", wall(+7200), 3, owner="cli pid 7"))
    past = two_region_shard(Transition("switchover", "west", wall(-7200), 3, owner="cli pid 8"))
    assert ride.in_transition(future) and ride.in_transition(past)  # first seen now: fresh
    clock.now += 29.0
    assert ride.in_transition(future) and ride.in_transition(past)
    clock.now += 2.0  # 31 s of the gateway's own time: abandoned, whatever `since` says
    assert not ride.in_transition(future) and not ride.in_transition(past)
    # A new transition (another owner, the same wall time) is a new one: fresh again.
    again = two_region_shard(Transition("switchover", "east/b", wall(+7200), 3, owner="cli pid 9"))
    assert ride.in_transition(again)
    assert not ride.in_transition(two_region_shard())


def test_first_seen_measures_from_the_first_sighting_and_forgets_what_is_gone() -> None:
    clock = Clock()
    seen: FirstSeen[str] = FirstSeen(clock=clock)
    assert seen.age("a") == 0.0
    clock.now += 5.0
    assert seen.age("a") == 5.0 and seen.age("b") == 0.0
    seen.keep({"b"})
    clock.now += 1.0
    assert seen.age("a") == 0.0 and seen.age("b") == 1.0


def test_a_transition_has_an_owner_in_the_record() -> None:
    transition = Transition.begin("switchover", "east/b", 3, owner="boxoffice shard switchover")
    assert Transition.from_json(transition.to_json()) == transition
    legacy = {"kind": "switchover", "target": "east/b", "since": wall(0), "epoch": 3}
    assert Transition.from_json(legacy).owner == ""


# --- class 7: abandoned moves ----------------------------------------------------------------

class MoveStore:
    def __init__(self, updated_at: float, index: int = 7) -> None:
        self.doc = {"state": "running", "target": "shard-2", "updatedAt": updated_at}
        self.index = index

    async def list_journals(self, kind_prefix: str = "") -> dict[str, tuple[dict[str, Any], int]]:
        return {f"{kind_prefix}ev-1": (self.doc, self.index)}

    async def lock_holder(self, name: str) -> LockState:
        return LockState(None, None, 1)


async def test_a_moves_journal_written_just_now_with_a_clock_behind_is_not_abandoned() -> None:
    """`updatedAt` an hour ago by the runner's clock, but written just now (a runner
    starting): not abandoned on first sight."""
    store = MoveStore(time.time() - 3600)
    assert await abandoned_moves(store, 2.0) == []  # type: ignore[arg-type]


async def test_an_abandoned_move_is_judged_by_the_observers_own_clock() -> None:
    clock = Clock()
    seen: FirstSeen[tuple[str, int]] = FirstSeen(clock=clock)
    store = MoveStore(time.time() + 3600)  # a runner's clock an hour ahead
    assert await abandoned_moves(store, 2.0, seen=seen) == []  # type: ignore[arg-type]
    clock.now += 2.5
    found = await abandoned_moves(store, 2.0, seen=seen)  # type: ignore[arg-type]
    assert [event for event, _ in found] == ["ev-1"]
    store.index = 8  # written again (a live runner's next step): young again
    assert await abandoned_moves(store, 2.0, seen=seen) == []  # type: ignore[arg-type]


# --- failover stays home ---------------------------------------------------------------------

def standby(host: str, lsn: str, timeline: int = 1, running: bool = True) -> CopyStatus:
    return CopyStatus(host, "c-east", f"c-east-{host}", running, "standby" if running else None,
                      timeline=timeline, receive_lsn=lsn, replay_lsn=lsn, streaming=False)


class Probes:
    def __init__(self, statuses: dict[str, CopyStatus | Exception]) -> None:
        self.statuses = statuses

    async def copy_status(self, host: str, shard: str) -> CopyStatus:
        status = self.statuses[host]
        if isinstance(status, Exception):
            raise status
        return status


class NoStore:
    """The controller is built, never run: nothing may reach the store."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the store was used: {name}")


async def test_the_controller_promotes_the_home_zone_standby_when_another_region_received_more() -> None:
    """Right after the primary died, west (asynchronous under FIRST 1) reports a higher
    received position than the zone standby east/b: east/b is still the candidate."""
    controller = Controller(NoStore(), "token", Settings("east"))  # type: ignore[arg-type]
    probes = Probes({"east/b": standby("east/b", "0/3000000"),
                     "west": standby("west", "0/3000100"), "west/b": standby("west/b", "0/3000080")})
    controller.probes = controller.agents = probes  # type: ignore[assignment]
    assert await controller._candidate(two_region_shard()) == "east/b"


def test_another_region_only_when_no_home_copy_qualifies_and_it_says_why() -> None:
    shard = two_region_shard()
    home_down = {"east/b": AgentUnreachable("east/b", "no answer"),
                 "west": standby("west", "0/3000100"), "west/b": standby("west/b", "0/3000080")}
    choice = choose_candidate(shard, home_down)
    assert choice.key == "west" and "east/b" in choice.why and "east" in choice.why
    not_running = {**home_down, "east/b": standby("east/b", "0/3000000", running=False)}
    assert choose_candidate(shard, not_running).key == "west"
    home_up = {**home_down, "east/b": standby("east/b", "0/3000000")}
    choice = choose_candidate(shard, home_up)
    assert choice.key == "east/b" and choice.why == ""
    # a copy on a newer timeline than every other is a different history: never preferred
    # for being home; the highest timeline among the qualifying copies decides first.
    newer = {**home_up, "west": standby("west", "0/1000", timeline=2)}
    assert choose_candidate(shard, newer).key == "west"
    assert choose_candidate(shard, {k: AgentUnreachable(k, "x") for k in home_up}).key is None


# --- class 1: the controller overtakes a committed promotion whose target is lost -------------

class DecideStore:
    """What `Controller._decide` reads: the record naming the lost target east/b at epoch
    4 (committed by a promotion from east at 3), Consul's check of east/b critical, the
    lease free, that promotion's journal."""

    def __init__(self) -> None:
        before = two_region_shard()
        self.shard = before.promoted("east/b", "0/3000000", ["east", "west", "west/b"])
        self.journal = {"op": "promote", "shard": "c-east", "target": "east/b", "from": "east",
                        "fromEpoch": 3, "newEpoch": 4, "phase": "committed",
                        "fromSyncStandbys": ["east/b", "west", "west/b"]}

    async def read_shard(self, name: str) -> tuple[Shard, int]:
        return self.shard, 11

    async def watch_instances(self, service: str, index: int) -> tuple[int, list[ServiceInstance]]:
        return 1, [ServiceInstance(service, "i", "127.0.0.1", 1, (), passing=False,
                                   url=self.shard.primary.service_url)]

    async def lock_holder(self, name: str) -> LockState:
        return LockState(None, None, 1)

    async def read_journal(self, op_id: str) -> tuple[dict[str, Any], int]:
        return self.journal, 5


async def test_the_controller_overtakes_a_committed_promotion_whose_target_is_lost() -> None:
    """Before issue 16 the controller took its target from the journal: the lost east/b,
    for ever. Now it chooses among the set from before and the old primary, home first:
    east, the old primary (demoted to a standby by its agent), holds everything."""
    store = DecideStore()
    controller = Controller(store, "token", Settings("east"))  # type: ignore[arg-type]
    probes = Probes({"east/b": AgentUnreachable("east/b", "no answer"),
                     "east": standby("east", "0/3000200"),
                     "west": standby("west", "0/3000100"), "west/b": standby("west/b", "0/3000080")})
    controller.probes = controller.agents = probes  # type: ignore[assignment]
    suspect = Suspect("east/b", 4, time.monotonic(), time.time())
    assert await controller._decide("c-east", suspect) == ("east", True)
    # the target answering as a standby (never promoted, its runner died): finished instead
    probes.statuses["east/b"] = standby("east/b", "0/3000000")
    assert await controller._decide("c-east", suspect) == ("east/b", False)


def test_a_lagging_timeline_report_does_not_send_the_shard_abroad() -> None:
    """Right after the primary died its standbys stream no more, and each reports the
    timeline of its last restartpoint: the zone standby, restarted since the last
    promotion, says 1 while west says 2. Both hold the shard's epoch row (3): both are on
    the current primary's history, so the home copy is still chosen. Seen on the real
    cluster (the zone standby rewound and restarted after an earlier failover)."""
    shard = two_region_shard()
    lagging = replace(standby("east/b", "0/3000000", timeline=1), epoch=3)
    statuses: dict[str, CopyStatus | BaseException] = {
        "east/b": lagging, "west": replace(standby("west", "0/3000100", timeline=2), epoch=3),
        "west/b": replace(standby("west/b", "0/3000080", timeline=2), epoch=3)}
    assert choose_candidate(shard, statuses).key == "east/b"
    assert effective_timelines(statuses, 3) == {"east/b": 2, "west": 2, "west/b": 2}
    # a copy with an older epoch row (an old primary never rewound) keeps its own timeline
    diverged = {**statuses, "east/b": replace(lagging, epoch=2)}
    assert effective_timelines(diverged, 3)["east/b"] == 1
    assert choose_candidate(shard, diverged).key == "west"


def test_the_standbys_view_counts_only_when_every_standby_lost_it() -> None:
    """The second detection signal beside Consul's check: at least one standby answered,
    running as one, and none of those streams. A standby that does not answer or does not
    run is no evidence; one that streams is evidence against."""
    lost = {"east/b": standby("east/b", "0/3000000"), "west": standby("west", "0/3000000")}
    assert standbys_lost_primary(lost)
    assert standbys_lost_primary({**lost, "west/b": AgentUnreachable("west/b", "no answer"),
                                  "west": standby("west", "0/3000000", running=False)})
    assert not standbys_lost_primary({**lost, "west": replace(lost["west"], streaming=True)})
    assert not standbys_lost_primary({"east/b": AgentUnreachable("east/b", "no answer"),
                                      "west": standby("west", "0/3000000", running=False)})
    assert not standbys_lost_primary({})


class PassingStore:
    """What `Controller._decide` reads when Consul's check of the primary still passes
    (it runs once a second): the shard record, the health view, a free lease, no journal."""

    def __init__(self) -> None:
        self.shard = two_region_shard()

    async def read_shard(self, name: str) -> tuple[Shard, int]:
        return self.shard, 11

    async def watch_instances(self, service: str, index: int) -> tuple[int, list[ServiceInstance]]:
        return 1, [ServiceInstance(service, "i", "127.0.0.1", 1, (), passing=True,
                                   url=self.shard.primary.service_url)]

    async def lock_holder(self, name: str) -> LockState:
        return LockState(None, None, 1)

    async def read_journal(self, op_id: str) -> tuple[dict[str, Any], int]:
        raise NotFound(op_id)


async def test_a_lost_host_whose_standbys_lost_it_is_failed_over_before_consuls_check() -> None:
    """The primary's agent does not answer and every standby's WAL receiver lost it: the
    failover is due although Consul's check has not run yet; with one standby still
    streaming, or with the signal off, it is not (Consul's check decides then)."""
    suspect = Suspect("east", 3, time.monotonic(), time.time(), "standbys")
    statuses: dict[str, CopyStatus | Exception] = {
        "east": AgentUnreachable("east", "no answer"), "east/b": standby("east/b", "0/3000000"),
        "west": standby("west", "0/3000000"), "west/b": standby("west/b", "0/3000000")}
    for on, streaming, due in ((True, False, "east/b"), (True, True, None), (False, False, None)):
        controller = Controller(PassingStore(), "token",  # type: ignore[arg-type]
                                Settings("east", standby_signal=on))
        probes = Probes({**statuses, "west": replace(standby("west", "0/3000000"), streaming=streaming)})
        controller.probes = controller.agents = probes  # type: ignore[assignment]
        assert await controller._decide("c-east", suspect) == (due, False), (on, streaming)
    # the primary's agent answering (its copy down, being restarted): never this signal
    controller = Controller(PassingStore(), "token", Settings("east"))  # type: ignore[arg-type]
    controller.probes = controller.agents = Probes(  # type: ignore[assignment]
        {**statuses, "east": standby("east", "0/3000000", running=False)})
    assert await controller._decide("c-east", suspect) == (None, False)


def test_the_standby_signal_is_on_unless_the_operator_turns_it_off() -> None:
    from failover.__main__ import parse_args

    assert parse_args(["--region", "east"]).standby_signal == "on"
    assert parse_args(["--region", "east", "--standby-signal", "off"]).standby_signal == "off"
    assert Settings("east").standby_signal
