"""Failover drills (failover/drill.py) run in-process against a cluster of their own:
regions east and west, sync zone, controllers on. The drill books through every
gateway, kills the primary's host, waits for the failover (the controller's, or its
own promotion with `manual`), restores full strength and audits the databases; the
report must say nothing was lost, oversold or duplicated and have its times filled.
The reports are printed; their times are not asserted.

Beside the drills that kill hosts runs `boxoffice up`'s supervision loop (`UpLoop`:
`Cluster.restart_dead` every 0.1 s, as deploy/cli.py's `cmd_up` calls it every second),
so the tests see what the README's cluster does: a host the drill lost must stay lost
until the drill restores it (failover/holddown.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from common.messages import DrillReport
from deploy.cluster import Cluster
from failover import holddown
from failover.drill import DrillCluster, DrillError, DrillSettings, format_report, run_drill
from region_map import Shard
from tests.conftest import ADMIN_TOKEN, own_cluster
from tests.support import poll

TOPOLOGY = {
    "name": "test-drill",
    "regions": {"east": {"location": "East"}, "west": {"location": "West"}},
    "latency_ms": {"east/west": 5},
    "shards": {"d-east": {"home": "east"}, "d-west": {"home": "west"}},
    "postgres": {"durable": False},
    "controller": {"enabled": True, "grace_ms": 400, "lock_ttl_seconds": 1},
}


@pytest.fixture(scope="module")
def drill_cluster(workdir: Path) -> Iterator[Cluster]:
    with own_cluster(workdir, "drill-cluster", TOPOLOGY) as c:
        yield c


def check_report(report: dict[str, Any], shard: str, *, detection: bool = True) -> None:
    print(format_report(report))
    assert report["shard"] == shard and report["ok"] is True
    assert report["outcome"] == "failed-over" and report["passed"] is True
    bookings = report["bookings"]
    assert bookings["confirmed"] > 0
    assert (bookings["missing"], bookings["oversold"], bookings["duplicatedReferences"]) == (0, 0, 0)
    assert report["newPrimary"] != report["oldPrimary"] and report["newEpoch"] == report["oldEpoch"] + 1
    times = report["times"]
    timed = ("promoteSeconds", "mapAtEveryGatewaySeconds", "writesBackSeconds", "fullStrengthSeconds")
    for key in ("detectSeconds", *timed) if detection else timed:
        assert isinstance(times[key], float), (key, times[key])
    assert set(times["mapAtGatewaySeconds"]) == {"east", "west"}
    assert report["writes"]["longestGapSeconds"] is not None
    assert set(report["writes"]["perShard"]) == {"d-east", "d-west"}
    assert all(f["confirmed"] > 0 for f in report["writes"]["perShard"].values())


class UpLoop:
    """`boxoffice up`'s loop beside the drill: restart what died (`Cluster.restart_dead`),
    recording each restart with its time (time.monotonic()). A task on the test's event
    loop, not a thread: a process's parent-death signal is tied to the thread that
    started it (deploy/procs.py), so a thread that ends would take its restarts along."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.restarts: list[tuple[float, str]] = []

    async def _run(self) -> None:
        while True:
            for name in self.cluster.restart_dead():
                self.restarts.append((time.monotonic(), name))
            await asyncio.sleep(0.1)  # the loop's period (cmd_up: 1 s), not a synchronisation

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[UpLoop]:
        task = asyncio.create_task(self._run())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Said:
    """A drill's progress lines, printed and kept with when they were said."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []

    def __call__(self, line: str) -> None:
        print(line)
        self.lines.append((time.monotonic(), line))

    def when(self, text: str) -> float:
        return next(t for t, line in self.lines if text in line)


async def test_kill_primary_drill_with_the_controller(drill_cluster: Cluster) -> None:
    """The controller fails the shard over while `up`'s loop runs beside the drill: the
    host the drill killed is not started again by the loop while the drill holds it
    down (from the fault until the drill restores full strength), and runs again after."""
    said = Said()
    async with UpLoop(drill_cluster).running() as loop:
        report = await run_drill(DrillCluster.from_cluster(drill_cluster),
                                 DrillSettings("d-east", "kill-primary"), said)
    agent = f"node-agent[{report['oldPrimary']}]"
    restore = said.when("restoring full strength")
    print(f"up loop restarts: {loop.restarts}; restore at {restore:.3f}")
    assert [name for t, name in loop.restarts if t < restore] == []
    check_report(report, "d-east")
    assert report["mode"] == "automatic" and report["times"]["controller"] is not None
    assert report["faultHosts"] == [report["oldPrimary"]]
    # After the restore the host runs again: started by the drill or by the loop.
    assert drill_cluster.agents[report["oldPrimary"]].running()
    assert report["restarted"] == [agent] or [name for _, name in loop.restarts] == [agent]
    await check_unlisted(drill_cluster, report)


async def check_unlisted(cluster: Cluster, report: dict[str, Any]) -> None:
    """The drill's events are readable by id but never in the public listing."""
    import aiohttp

    assert cluster.plan is not None
    base = cluster.plan.gateway_url("east")
    listed: set[str] = set()
    async with aiohttp.ClientSession() as s:
        for event_id in report["events"].values():
            async with s.get(f"{base}/api/events/{event_id}") as resp:
                assert resp.status == 200, await resp.text()
        cursor: str | None = None
        for _ in range(100):
            params = {"limit": "100"} | ({"cursor": cursor} if cursor else {})
            async with s.get(f"{base}/api/events", params=params) as resp:
                page = await resp.json()
                assert resp.status == 200, page
            listed |= {e["id"] for e in page["events"]}
            if (cursor := page["nextCursor"]) is None:
                break
    assert listed and not listed & set(report["events"].values())


async def test_kill_primary_drill_promoted_by_hand(drill_cluster: Cluster) -> None:
    report = await run_drill(DrillCluster.from_cluster(drill_cluster),
                             DrillSettings("d-west", "kill-primary", manual=True), print)
    check_report(report, "d-west")
    assert report["mode"] == "manual" and report["promotion"]["outcome"] == "promoted"
    assert report["times"]["detectedBy"].startswith("the drill's probe")
    assert sorted(report["pausedControllers"]) == ["controller[east]", "controller[west]"]
    # The controllers were resumed: exactly one holds the lock again.
    docs = [await asyncio.to_thread(drill_cluster.controller_status, r) for r in ("east", "west")]
    assert all(docs)


async def test_an_unknown_shard_or_kind_is_refused(drill_cluster: Cluster) -> None:
    cluster = DrillCluster.from_cluster(drill_cluster)
    with pytest.raises(DrillError):
        await run_drill(cluster, DrillSettings("d-east", "kill-everything"))
    with pytest.raises(DrillError):
        await run_drill(cluster, DrillSettings("no-such-shard"))


async def test_the_admin_api_runs_a_drill_through_the_agents_and_services(drill_cluster: Cluster) -> None:
    """POST /admin/drills/failover on a gateway: the fault through the node agent's
    drill primitive (the host's servers and service SIGKILLed, kept down, then
    recovered), the audit through the booking services; nothing lost."""
    import aiohttp

    assert drill_cluster.plan is not None
    url = f"{drill_cluster.plan.gateway_url('west')}/admin/drills/failover"
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={"shard": "d-east"}) as resp:
            assert resp.status == 401
        async with s.post(url, json={"shard": "nope"}, headers=auth) as resp:
            assert resp.status == 400
        async with s.post(url, json={"shard": "d-east", "kind": "kill-everything"}, headers=auth) as resp:
            assert resp.status == 400
        async with s.post(url, json={"shard": "d-east", "kind": "kill-primary"}, headers=auth,
                          timeout=aiohttp.ClientTimeout(total=300)) as resp:
            report = await resp.json()
            assert resp.status == 200, report
    # (Detection is the controller's: a gateway does not know the controllers' status
    # URLs, and with no client error there is no first failed booking to time it by.)
    check_report(report, "d-east", detection=report["times"]["detectSeconds"] is not None)
    assert report["restarted"] == [f"host {report['oldPrimary']}"]
    # The answer is what the OpenAPI document says it is (the typed DrillReport).
    typed = msgspec.convert(report, DrillReport)
    assert typed.passed and typed.outcome == typed.expected


async def test_a_host_restarted_behind_the_drill_is_reported_at_once(drill_cluster: Cluster) -> None:
    """Something that ignores the hold-down (an init system not told) starts the killed
    host again at once, while every controller is paused: the old primary is back
    before any promotion, so none will come. The drill says so in its report
    (`survived-without-failover`, with why) as soon as the shard takes bookings again,
    instead of waiting its 120 s for a new primary; nothing is lost."""
    shard = (await asyncio.to_thread(_map_shard, drill_cluster, "d-west"))
    host = shard.primary_copy
    controllers = [p.pid for p in drill_cluster.controllers.values() if p.pid is not None]
    said = Said()
    back: list[asyncio.Task[object]] = []

    async def bring_back() -> None:
        agent = drill_cluster.agents[host]

        async def exited() -> bool:
            return not agent.running()
        await poll(exited, f"{host}'s killed agent has exited")
        assert drill_cluster.restart_dead() == [agent.name]

    def progress(line: str) -> None:
        said(line)
        if "fault:" in line:  # the host is killed and held: pause the controllers, bring it back
            for pid in controllers:
                os.kill(pid, signal.SIGSTOP)
            holddown.release(drill_cluster.state_dir, host)
            back.append(asyncio.create_task(bring_back()))

    try:
        report = await run_drill(DrillCluster.from_cluster(drill_cluster),
                                 # (the paused controllers are no reason to give up while the
                                 # host's agent starts again, however slowly)
                                 DrillSettings("d-west", "kill-primary", no_controller_seconds=120.0),
                                 progress)
    finally:
        for pid in controllers:
            os.kill(pid, signal.SIGCONT)
    await back[0]
    print(format_report(report))
    assert report["outcome"] == "survived-without-failover" and "came back" in report["why"]
    assert report["passed"] is False and report["ok"] is True
    assert report["newPrimary"] == report["oldPrimary"] == host
    assert report["newEpoch"] == report["oldEpoch"]
    assert report["bookings"]["missing"] == 0 and report["bookings"]["confirmed"] > 0
    assert "NO FAILOVER" in format_report(report).splitlines()[0]


def _map_shard(cluster: Cluster, name: str) -> Shard:
    from region_map import ConsulMapStore

    async def read() -> Shard:
        assert cluster.consul is not None
        async with ConsulMapStore(port=cluster.consul.http_port, prefix=cluster.map_prefix) as store:
            return (await store.read_shard(name))[0]
    return asyncio.run(read())


def test_a_fault_that_takes_a_synchronous_standby_too_expects_no_failover() -> None:
    """Pure rule (failover/drill.py `no_failover_expected`): the promotion primitive
    promotes only a member of the synchronous set with every other member heard from,
    so a fault that kills a member with the primary (a region of a `sync: zone` shard)
    expects no automatic failover; one that leaves the set alive expects one."""
    from failover.drill import no_failover_expected
    from region_map import ShardMember

    def member(region: str, zone: str = "a") -> ShardMember:
        return ShardMember(region=region, zone=zone, service_url=f"http://{region}-{zone}", db_address="x:1")

    zone_sync = Shard(name="s", epoch=1, primary_copy="east",
                      members={"east": member("east"), "east/b": member("east", "b"), "west": member("west")},
                      sync_standbys=("east/b", "west"), sync_mode="zone")
    assert no_failover_expected(zone_sync, ["east"]) == ""  # kill-primary, kill-zone
    assert "east/b" in no_failover_expected(zone_sync, ["east", "east/b"])  # kill-region
    assert no_failover_expected(zone_sync, ["west"]) == ""  # the primary survives
    unsynced = Shard(name="s", epoch=1, primary_copy="east", members={"east": member("east"),
                     "west": member("west")}, sync_standbys=(), sync_mode="off")
    assert "no synchronous standby" in no_failover_expected(unsynced, ["east"])
