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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.cluster import Cluster
from failover.drill import DrillCluster, DrillError, DrillSettings, format_report, run_drill
from tests.conftest import ADMIN_TOKEN, own_cluster

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
    """`boxoffice up`'s loop in a thread: restart what died (`Cluster.restart_dead`),
    recording each restart with its time (time.monotonic())."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.restarts: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.1):  # the loop's period (cmd_up: 1 s)
            for name in self.cluster.restart_dead():
                self.restarts.append((time.monotonic(), name))

    @contextlib.contextmanager
    def running(self) -> Iterator[UpLoop]:
        self.thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            self.thread.join()


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
    with UpLoop(drill_cluster).running() as loop:
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
