"""Failover drills (failover/drill.py) run in-process against a cluster of their own:
regions east and west, sync zone, controllers on. The drill books through every
gateway, kills the primary's host, waits for the failover (the controller's, or its
own promotion with `manual`), restores full strength and audits the databases; the
report must say nothing was lost, oversold or duplicated and have its times filled.
The reports are printed; their times are not asserted.
"""

from __future__ import annotations

import asyncio
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


async def test_kill_primary_drill_with_the_controller(drill_cluster: Cluster) -> None:
    report = await run_drill(DrillCluster.from_cluster(drill_cluster),
                             DrillSettings("d-east", "kill-primary"), print)
    check_report(report, "d-east")
    assert report["mode"] == "automatic" and report["times"]["controller"] is not None
    assert report["faultHosts"] == [report["oldPrimary"]]
    assert report["restarted"] == [f"node-agent[{report['oldPrimary']}]"]


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
