"""The promotion primitive's rules on plain fakes of the map store and the node agents:
candidate selection per sync mode, force and refusals, the order of the steps, and
resuming a journal before and after the commit point."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import replace
from typing import Any

import pytest

from failover.agents import AgentError, AgentFailed, AgentUnreachable, CopyStatus, application_name
from failover.lease import LEASE_TTL
from failover.promote import (
    PromoteFailed,
    PromoteRefused,
    StepEvent,
    journal_id,
    next_sync_set,
    promote,
)
from region_map import CasConflict, LockState, NotFound, Region, Shard, ShardMember, check_epoch_rules


def member(region: str, zone: str = "a", port: int = 5000) -> ShardMember:
    return ShardMember(region, f"http://svc/{region}/{zone}", f"127.0.0.1:{port}", zone)


def zone_shard() -> Shard:
    """shard-a: primary east, zone standby east/b (synchronous), west asynchronous."""
    return Shard("shard-a", 1, "east",
                 {"east": member("east", port=5001), "east/b": member("east", "b", 5002),
                  "west": member("west", port=5003)},
                 sync_standbys=("east/b",), sync_mode="zone")


def region_shard() -> Shard:
    """shard-r: primary east; west and north both in an ANY 1 quorum."""
    return Shard("shard-r", 4, "east",
                 {"east": member("east", port=5001), "west": member("west", port=5003),
                  "north": member("north", port=5004)},
                 sync_standbys=("north", "west"), sync_mode="region")


def off_shard() -> Shard:
    return Shard("shard-o", 1, "east", {"east": member("east", port=5001), "west": member("west", port=5003)},
                 sync_mode="off")


class FakeStore:
    """The part of MapStore a promotion uses: one shard record, journals, one lock."""

    def __init__(self, shard: Shard, log: list[str]) -> None:
        self.shard, self.index = shard, 10
        self.log = log
        self.journals: dict[str, tuple[dict[str, Any], int]] = {}
        self.locks: dict[str, tuple[str | None, dict[str, Any] | None]] = {}
        self.sessions: set[str] = set()
        self.next_index = 100

    def _bump(self) -> int:
        self.next_index += 1
        return self.next_index

    async def read_shard(self, name: str) -> tuple[Shard, int]:
        if name != self.shard.name:
            raise NotFound(name)
        return self.shard, self.index

    async def read_regions(self) -> dict[str, Region]:
        return {}  # no latency figures: the fallbacks by name

    async def put_shard(self, shard: Shard, expected_index: int) -> None:
        if expected_index != self.index:
            raise CasConflict(f"shards/{shard.name}", expected_index)
        check_epoch_rules(self.shard, shard)
        self.log.append(f"map:{shard.primary_copy}@{shard.epoch}")
        self.shard, self.index = shard, self._bump()

    async def read_journal(self, op_id: str) -> tuple[dict[str, Any], int]:
        if op_id not in self.journals:
            raise NotFound(op_id)
        doc, index = self.journals[op_id]
        return copy.deepcopy(doc), index

    async def put_journal(self, op_id: str, doc: dict[str, Any], expected_index: int) -> int:
        current = self.journals.get(op_id)
        if (current[1] if current else 0) != expected_index:
            raise CasConflict(op_id, expected_index)
        index = self._bump()
        self.journals[op_id] = (copy.deepcopy(doc), index)
        return index

    async def delete_journal(self, op_id: str, expected_index: int) -> None:
        current = self.journals.get(op_id)
        if current is not None and current[1] != expected_index:
            raise CasConflict(op_id, expected_index)
        self.journals.pop(op_id, None)

    async def create_session(self, name: str, ttl_seconds: float) -> str:
        session = f"s{self._bump()}"
        self.sessions.add(session)
        return session

    async def renew_session(self, session_id: str) -> bool:
        return session_id in self.sessions

    async def destroy_session(self, session_id: str) -> None:
        self.sessions.discard(session_id)
        for name, (holder, value) in list(self.locks.items()):
            if holder == session_id:
                self.locks[name] = (None, value)

    async def acquire_lock(self, name: str, session_id: str, value: dict[str, Any]) -> bool:
        holder, _ = self.locks.get(name, (None, None))
        if holder not in (None, session_id):
            return False
        self.locks[name] = (session_id, value)
        return True

    async def lock_holder(self, name: str) -> LockState:
        holder, value = self.locks.get(name, (None, None))
        return LockState(holder, value, 1)

    def lock_free(self) -> bool:
        return all(holder is None for holder, _ in self.locks.values())


class FakeAgents:
    """One copy per host, as GET /agent/copies would report it; every primitive is logged."""

    def __init__(self, shard: Shard, log: list[str]) -> None:
        self.log = log
        self.addresses = {m.db_address: k for k, m in shard.members.items()}
        self.copies: dict[str, CopyStatus] = {}
        self.down: set[str] = set()  # hosts whose agent does not answer
        self.fail: dict[str, AgentError] = {}  # primitive name -> error to raise
        for key in shard.members:
            primary = key == shard.primary_copy
            self.copies[key] = CopyStatus(
                host=key, shard=shard.name, name=application_name(shard.name, key), running=True,
                role="primary" if primary else "standby", timeline=1,
                flush_lsn="0/3000100" if primary else None,
                receive_lsn=None if primary else "0/3000100", replay_lsn=None if primary else "0/3000100",
                streaming=not primary, epoch=shard.epoch)
        self.sync_calls: list[tuple[str, list[str], str]] = []

    def at(self, host: str, lsn: str, replay: str | None = None) -> None:
        self.copies[host] = replace(self.copies[host], receive_lsn=lsn, replay_lsn=replay or lsn)

    def _reach(self, host: str, what: str) -> None:
        if host in self.down:
            raise AgentUnreachable(host, "no answer")
        if what in self.fail:
            raise self.fail[what]

    async def copy_status(self, host: str, shard: str) -> CopyStatus:
        self._reach(host, "status")
        status = self.copies[host]
        if status.role == "standby" and not status.replayed_all:  # replay moves on
            self.copies[host] = replace(status, replay_lsn=status.receive_lsn)
        return status

    async def set_sync(self, host: str, shard: str, standbys: list[str], mode: str) -> str:
        self._reach(host, "sync")
        self.log.append(f"sync:{host}")
        self.sync_calls.append((host, standbys, mode))
        return f"{mode} {standbys}"

    async def repoint(self, host: str, shard: str, primary: str) -> bool:
        self._reach(host, "repoint")
        self.log.append(f"repoint:{host}->{primary}")
        upstream = self.copies[self.addresses[primary]]
        if upstream.role == "standby" and (upstream.position or 0) > (self.copies[host].position or 0):
            # cascading from a standby that is ahead: what it has streams over
            self.copies[host] = replace(self.copies[host], receive_lsn=upstream.position_lsn)
        return True

    async def promote(self, host: str, shard: str, epoch: int) -> dict[str, Any]:
        self._reach(host, "promote")
        self.log.append(f"promote:{host}@{epoch}")
        was = self.copies[host].role
        self.copies[host] = replace(self.copies[host], role="primary", epoch=epoch)
        return {"promoted": was == "standby", "epoch": epoch}


def setup(shard: Shard) -> tuple[FakeStore, FakeAgents, list[str]]:
    log: list[str] = []
    return FakeStore(shard, log), FakeAgents(shard, log), log


def writes(log: list[str]) -> list[str]:
    return [entry.split(":")[0] for entry in log]


class Crash(Exception):
    """A runner that dies at a step (the fault hook raises it)."""


def crash_after(step: str):  # type: ignore[no-untyped-def]
    async def hook(name: str) -> None:
        if name == step:
            raise Crash(name)
    return hook


# --- the set after the promotion -----------------------------------------------------------

def test_next_sync_set_per_mode() -> None:
    # zone mode: the old primary's copy first, then the other regions' (FIRST 1: the
    # first connected), so losing the whole zone does not stop commits
    assert next_sync_set(zone_shard(), "east/b") == ("zone", ["east", "west"])
    # zone mode, a region without a second copy: the other regions' copies, ANY 1
    assert next_sync_set(zone_shard(), "west") == ("region", ["east", "east/b"])
    assert next_sync_set(region_shard(), "west") == ("region", ["east", "north"])
    assert next_sync_set(off_shard(), "west") == ("off", [])


def test_next_sync_set_falls_back_to_the_nearest_region_first() -> None:
    """After a failover to the zone standby its zone partner (the old primary) is gone, so
    the first commit of the new epoch waits for the first connected fallback: the nearest
    region's copy, by the candidate's region's latency figures, not the first by name."""
    shard = Shard("shard-n", 1, "east",
                  {"east": member("east", port=5001), "east/b": member("east", "b", 5002),
                   "apac": member("apac", port=5003), "west": member("west", port=5004)},
                  sync_standbys=("east/b",), sync_mode="zone")
    regions = {"east": Region("east", "http://east", "East", {"west": 35, "apac": 90}),
               "west": Region("west", "http://west", "West", {"east": 35, "apac": 55}),
               "apac": Region("apac", "http://apac", "APAC", {"east": 90, "west": 55})}
    assert next_sync_set(shard, "east/b", regions) == ("zone", ["east", "west", "apac"])
    assert next_sync_set(shard, "east", regions) == ("zone", ["east/b", "west", "apac"])
    # a region without a second copy: ANY 1, nearest first (the order Postgres is given)
    assert next_sync_set(shard, "apac", regions) == ("region", ["west", "east", "east/b"])
    # a region the figures do not list comes last; no figures at all: by name
    regions["east"] = Region("east", "http://east", "East", {"west": 35})
    assert next_sync_set(shard, "east/b", regions) == ("zone", ["east", "west", "apac"])
    assert next_sync_set(shard, "east/b") == ("zone", ["east", "apac", "west"])


def test_application_name_is_the_launchers_convention() -> None:
    from deploy.cluster import server_name

    for key in ("east", "east/b", "us-west-2/c"):
        assert application_name("shard-1", key) == server_name("shard-1", key)


# --- zone mode ------------------------------------------------------------------------------

async def test_zone_standby_is_promoted_in_order() -> None:
    store, agents, log = setup(zone_shard())
    events: list[StepEvent] = []
    report = await promote(store, agents, "shard-a", "east/b", progress=events.append)

    assert log == ["sync:east/b", "repoint:west->127.0.0.1:5002", "map:east/b@2", "promote:east/b@2"]
    assert agents.sync_calls == [("east/b", ["shard-a-east", "shard-a-west"], "zone")]
    assert store.shard.primary_copy == "east/b" and store.shard.epoch == 2
    assert store.shard.sync_standbys == ("east", "west")
    assert store.shard.epoch_lsn == "0/3000100"
    assert report.outcome == "promoted" and report.old_primary == "east" and report.new_epoch == 2
    assert [s.name for s in report.steps] == ["check", "catch-up", "sync-set", "repoint", "commit", "promote"]
    assert [e.step for e in events if e.state == "ok"] == [s.name for s in report.steps]
    assert report.repointed == ["west"] and report.lost is None
    assert "demotes it" in report.old_primary_next  # the fake's old primary still runs as one
    assert store.journals == {} and store.lock_free()


async def test_a_first_zone_spelled_region_slash_zone_names_the_regions_copy() -> None:
    store, agents, _ = setup(zone_shard())
    with pytest.raises(PromoteRefused) as refused:
        await promote(store, agents, "shard-a", "west/a")
    assert refused.value.kind == "not-in-sync-set" and "west is not in" in refused.value.detail


async def test_a_copy_outside_the_sync_set_is_refused_and_nothing_changes() -> None:
    store, agents, log = setup(zone_shard())
    before = store.shard
    with pytest.raises(PromoteRefused) as refused:
        await promote(store, agents, "shard-a", "west")
    assert refused.value.kind == "not-in-sync-set"
    assert log == [] and store.shard is before and store.journals == {} and store.lock_free()


async def test_force_promotes_outside_the_set_and_reports_what_may_be_lost() -> None:
    store, agents, log = setup(zone_shard())
    agents.at("west", "0/3000000")  # behind the zone standby and the old primary
    agents.down.add("east")  # the old primary's host is gone
    report = await promote(store, agents, "shard-a", "west", force=True)

    assert report.forced and report.lost is not None
    assert report.lost["notInSyncSet"] is True
    assert report.lost["ahead"]["east/b"]["bytesAhead"] == 0x100
    assert set(report.lost["notHeardFrom"]) == {"east"}
    assert agents.sync_calls == [("west", ["shard-a-east", "shard-a-east-b"], "region")]
    assert log == ["sync:west", "repoint:east/b->127.0.0.1:5003", "map:west@2", "promote:west@2"]
    assert "not answer" in report.old_primary_next


# --- region mode (ANY 1 quorum) --------------------------------------------------------------

async def test_a_candidate_behind_another_of_the_set_first_catches_up_from_it() -> None:
    """ANY 1 (west, north): north holds more than west (commits it alone confirmed, or
    WAL never confirmed). West, chosen, first streams the rest from north (cascading),
    then is promoted at north's position: nothing is lost."""
    store, agents, log = setup(region_shard())
    agents.at("north", "0/3000200")
    north = store.shard.members["north"].db_address
    report = await promote(store, agents, "shard-r", "west")
    assert log[0] == f"repoint:west->{north}"  # the catch-up source, before anything else
    assert agents.copies["west"].receive_lsn == "0/3000200"  # it streamed the rest
    assert store.shard.primary_copy == "west" and store.shard.epoch_lsn == "0/3000200"
    assert report.lost is None and "catches up from it" in report.steps[0].detail

    store, agents, log = setup(region_shard())
    agents.at("north", "0/3000200")
    report = await promote(store, agents, "shard-r", "north")  # the most recent: no detour
    assert store.shard.primary_copy == "north" and store.shard.epoch == 5
    assert not log[0].startswith("repoint:north")
    assert agents.sync_calls == [("north", ["shard-r-east", "shard-r-west"], "region")]
    assert store.shard.sync_standbys == ("east", "west") and report.lost is None


async def test_region_every_listed_standby_must_answer_unless_forced() -> None:
    store, agents, log = setup(region_shard())
    agents.down.add("north")
    with pytest.raises(PromoteRefused) as refused:
        await promote(store, agents, "shard-r", "west")
    assert "north not heard from" in refused.value.detail and log == []

    report = await promote(store, agents, "shard-r", "west", force=True)
    assert report.lost is not None and set(report.lost["notHeardFrom"]) == {"north"}
    assert report.not_repointed == {"north": "its node agent did not answer"}
    assert store.shard.primary_copy == "west"


async def test_a_later_timeline_counts_as_ahead() -> None:
    """north is on a later timeline and does not hold the shard's epoch row (4): another
    history, ahead whatever its position."""
    store, agents, _ = setup(region_shard())
    agents.copies["north"] = replace(agents.copies["north"], timeline=2, receive_lsn="0/2000000",
                                     replay_lsn="0/2000000", epoch=3)
    with pytest.raises(PromoteRefused):
        await promote(store, agents, "shard-r", "west")


async def test_a_lagging_timeline_report_with_the_epoch_row_is_not_another_history() -> None:
    """west reports timeline 1 (its last restartpoint: it streams no more) while north
    says 2; both hold the shard's epoch row 4, so both replayed its primary's first write:
    the same history. west is promoted, first catching up from north (ahead of it)."""
    store, agents, log = setup(region_shard())
    agents.copies["west"] = replace(agents.copies["west"], timeline=1)
    agents.copies["north"] = replace(agents.copies["north"], timeline=2, receive_lsn="0/3000200",
                                     replay_lsn="0/3000200")
    report = await promote(store, agents, "shard-r", "west")
    assert report.outcome == "promoted" and "repoint:west->127.0.0.1:5004" in log


# --- sync off ---------------------------------------------------------------------------------

async def test_off_mode_needs_force_and_sets_no_standbys() -> None:
    store, agents, _ = setup(off_shard())
    with pytest.raises(PromoteRefused) as refused:
        await promote(store, agents, "shard-o", "west")
    assert refused.value.kind == "not-in-sync-set"
    await promote(store, agents, "shard-o", "west", force=True)
    assert agents.sync_calls == [("west", [], "off")]
    assert store.shard.sync_standbys == () and store.shard.primary_copy == "west"


# --- refusals and failures ---------------------------------------------------------------------

async def test_unknown_shard_and_copy_are_refused() -> None:
    store, agents, _ = setup(zone_shard())
    with pytest.raises(PromoteRefused) as refused:
        await promote(store, agents, "shard-x", "east/b")
    assert refused.value.kind == "unknown-shard"
    with pytest.raises(PromoteRefused) as refused:
        await promote(store, agents, "shard-a", "east/c")
    assert refused.value.kind == "unknown-copy"


async def test_unreachable_candidate_fails_without_changes() -> None:
    store, agents, log = setup(zone_shard())
    agents.down.add("east/b")
    with pytest.raises(PromoteFailed) as failed:
        await promote(store, agents, "shard-a", "east/b")
    assert failed.value.kind == "candidate-unreachable" and not failed.value.committed
    assert log == [] and store.journals == {} and store.lock_free()


async def test_failed_sync_set_rolls_back_before_any_repoint() -> None:
    store, agents, log = setup(zone_shard())
    agents.fail["sync"] = AgentFailed("east/b", 503, "database-unavailable", "no answer")
    with pytest.raises(PromoteFailed) as failed:
        await promote(store, agents, "shard-a", "east/b")
    assert failed.value.kind == "sync-set-failed"
    assert log == [] and store.shard.epoch == 1 and store.journals == {}


async def test_a_map_changed_since_the_read_is_refused_and_rolled_back() -> None:
    store, agents, log = setup(zone_shard())

    async def someone_writes(step: str) -> None:
        if step == "repoint":
            store.shard = store.shard.with_sync_standbys(["east/b", "west"])
            store.index += 1

    with pytest.raises(PromoteRefused) as refused:
        await promote(store, agents, "shard-a", "east/b", fault_hook=someone_writes)
    assert refused.value.kind == "map-changed"
    assert store.shard.epoch == 1 and store.journals == {} and store.lock_free()
    # the old primary answers as a primary: the repointed standby goes back to it
    assert log == ["sync:east/b", "repoint:west->127.0.0.1:5002", "repoint:west->127.0.0.1:5001"]


async def test_a_running_operation_on_the_shard_refuses_another() -> None:
    store, agents, _ = setup(zone_shard())
    session = await store.create_session("other", LEASE_TTL)
    assert await store.acquire_lock("shard-op-shard-a", session, {"owner": "controller", "pid": 7})
    with pytest.raises(PromoteRefused) as refused:
        await promote(store, agents, "shard-a", "east/b")
    assert refused.value.kind == "operation-in-progress" and "controller" in refused.value.detail


# --- resuming a journal ---------------------------------------------------------------------------

async def test_interrupted_before_the_commit_point_is_rolled_back_then_promoted() -> None:
    store, agents, log = setup(zone_shard())
    with pytest.raises(Crash):
        await promote(store, agents, "shard-a", "east/b", fault_hook=crash_after("repoint"))
    doc, _ = store.journals[journal_id("shard-a")]
    assert doc["phase"] == "prepared" and doc["repointed"] == ["west"]
    assert store.shard.epoch == 1 and store.lock_free()

    log.clear()
    report = await promote(store, agents, "shard-a", "east/b")
    assert report.resumed == "rolled-back" and report.outcome == "promoted"
    assert log == ["repoint:west->127.0.0.1:5001",  # rollback: back to the old primary
                   "sync:east/b", "repoint:west->127.0.0.1:5002", "map:east/b@2", "promote:east/b@2"]
    assert report.steps[0].name == "rollback"
    assert store.journals == {}


async def test_interrupted_after_the_commit_point_is_finished() -> None:
    store, agents, log = setup(zone_shard())
    with pytest.raises(Crash):
        await promote(store, agents, "shard-a", "east/b", fault_hook=crash_after("commit"))
    assert store.shard.primary_copy == "east/b" and store.shard.epoch == 2
    assert store.journals[journal_id("shard-a")][0]["phase"] == "committed"
    assert agents.copies["east/b"].role == "standby"

    log.clear()
    report = await promote(store, agents, "shard-a", "east/b")
    assert report.resumed == "finished" and report.outcome == "finished"
    assert log == ["promote:east/b@2"]  # only what was left; no second epoch bump
    assert report.old_primary == "east" and report.new_epoch == 2 and report.old_epoch == 1
    assert store.journals == {} and agents.copies["east/b"].role == "primary"


async def test_a_failed_promote_after_the_commit_is_finished_by_running_again() -> None:
    store, agents, _ = setup(zone_shard())
    agents.fail["promote"] = AgentFailed("east/b", 503, "database-unavailable", "no answer")
    with pytest.raises(PromoteFailed) as failed:
        await promote(store, agents, "shard-a", "east/b")
    assert failed.value.committed and failed.value.kind == "promote-failed"
    assert journal_id("shard-a") in store.journals
    del agents.fail["promote"]
    report = await promote(store, agents, "shard-a", "east/b")
    assert report.resumed == "finished" and store.shard.epoch == 2 and store.journals == {}


async def test_an_unfinished_promotion_to_another_copy_is_rolled_back_and_superseded() -> None:
    """Before its commit point a dead runner's promotion pins nothing: a promotion to
    another copy rolls it back and runs (issue 16, class 1)."""
    store, agents, log = setup(zone_shard())
    with pytest.raises(Crash):
        await promote(store, agents, "shard-a", "east/b", fault_hook=crash_after("repoint"))
    log.clear()
    report = await promote(store, agents, "shard-a", "west", force=True)
    assert report.resumed == "rolled-back" and report.outcome == "promoted"
    assert store.shard.primary_copy == "west" and store.shard.epoch == 2 and store.journals == {}
    assert log[0] == "repoint:west->127.0.0.1:5001"  # the rollback first


def lose_target_after_commit(agents: FakeAgents, target: str, old_primary_demoted: bool = True):  # type: ignore[no-untyped-def]
    """The fault: the target's host is lost right after the commit; the old primary's
    node agent demotes it (a standby of the map's primary, which does not answer)."""
    async def hook(name: str) -> None:
        if name == "commit":
            agents.down.add(target)
            old = agents.copies["east"]
            if old_primary_demoted:
                agents.copies["east"] = replace(old, role="standby", receive_lsn=old.flush_lsn,
                                                replay_lsn=old.flush_lsn, flush_lsn=None)
            raise Crash(name)
    return hook


async def test_a_committed_promotion_whose_target_is_lost_is_overtaken() -> None:
    store, agents, log = setup(zone_shard())
    with pytest.raises(Crash):
        await promote(store, agents, "shard-a", "east/b",
                      fault_hook=lose_target_after_commit(agents, "east/b"))
    assert store.shard.primary_copy == "east/b" and store.shard.epoch == 2
    log.clear()
    report = await promote(store, agents, "shard-a", "east")  # the old primary: it has everything
    assert report.resumed == "overtaken" and report.outcome == "promoted"
    assert (report.old_primary, report.old_epoch, report.new_epoch) == ("east/b", 2, 3)
    assert store.shard.primary_copy == "east" and store.shard.epoch == 3 and store.journals == {}
    assert "map:east@3" in log and log[-1] == "promote:east@3"
    assert any("never made east/b writable" in n for n in report.notes)


async def test_overtaking_a_lost_target_checks_the_set_from_before() -> None:
    """Before: east primary, set (east/b). The target east/b and the old primary east are
    both gone: a booking confirmed by east/b alone may be lost, so west is refused (it
    was never in the set), unless forced; forced, it says what may be lost."""
    store, agents, _ = setup(zone_shard())
    with pytest.raises(Crash):
        await promote(store, agents, "shard-a", "east/b",
                      fault_hook=lose_target_after_commit(agents, "east/b", old_primary_demoted=False))
    agents.down.add("east")
    with pytest.raises(PromoteRefused) as refused:
        await promote(store, agents, "shard-a", "west")
    assert refused.value.kind == "not-in-sync-set", refused.value.detail
    assert store.shard.primary_copy == "east/b" and store.shard.epoch == 2
    report = await promote(store, agents, "shard-a", "west", force=True)
    assert report.resumed == "overtaken" and store.shard.primary_copy == "west" and store.shard.epoch == 3
    assert report.lost is not None and report.lost["notInSyncSet"]


async def test_a_committed_promotion_whose_target_runs_as_a_primary_is_not_overtaken() -> None:
    store, agents, _ = setup(zone_shard())
    with pytest.raises(Crash):
        await promote(store, agents, "shard-a", "east/b", fault_hook=crash_after("commit"))
    agents.copies["east/b"] = replace(agents.copies["east/b"], role="primary", flush_lsn="0/3000100")
    with pytest.raises(PromoteRefused) as refused:
        await promote(store, agents, "shard-a", "west", force=True)
    assert refused.value.kind == "operation-in-progress" and "--to east/b" in refused.value.detail


async def test_a_lost_target_that_wrote_its_epoch_row_is_failed_over_by_its_own_set() -> None:
    """A copy holding the dead target's epoch row shows it was promoted and wrote: its
    own synchronous set applies (here east, the old primary, now its standby)."""
    store, agents, _ = setup(zone_shard())
    with pytest.raises(Crash):
        await promote(store, agents, "shard-a", "east/b",
                      fault_hook=lose_target_after_commit(agents, "east/b"))
    agents.copies["east"] = replace(agents.copies["east"], epoch=2)
    report = await promote(store, agents, "shard-a", "east")
    assert report.resumed == "overtaken" and store.shard.epoch == 3
    assert any("was promoted after all" in n for n in report.notes)


async def test_a_stale_journal_is_cleared() -> None:
    store, agents, _ = setup(zone_shard())
    with pytest.raises(Crash):
        await promote(store, agents, "shard-a", "east/b", fault_hook=crash_after("catch-up"))
    store.shard = store.shard.with_primary("west")  # someone else moved the shard on
    agents.copies["west"] = replace(agents.copies["west"], role="primary")
    report = await promote(store, agents, "shard-a", "east/b", force=True)
    assert report.resumed == "stale-journal-cleared" and store.shard.epoch == 3


async def test_promoting_the_primary_again_is_idempotent() -> None:
    store, agents, log = setup(zone_shard())
    await promote(store, agents, "shard-a", "east/b")
    log.clear()
    report = await promote(store, agents, "shard-a", "east/b")
    assert report.outcome == "already-primary" and log == ["promote:east/b@2"]
    assert store.shard.epoch == 2


async def test_two_runners_at_once_one_promotes() -> None:
    store, agents, _ = setup(zone_shard())
    results = await asyncio.gather(promote(store, agents, "shard-a", "east/b"),
                                   promote(store, agents, "shard-a", "east/b"), return_exceptions=True)
    outcomes = sorted(r.outcome if not isinstance(r, BaseException) else r.kind for r in results)  # type: ignore[union-attr]
    assert outcomes in (["operation-in-progress", "promoted"], ["already-primary", "promoted"])
    assert store.shard.epoch == 2
