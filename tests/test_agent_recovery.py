"""Node agents bring a copy back once nothing holds it down (issue 16, chaos drill), on
the suite's shared cluster (tests/conftest.py `cluster`; no failover controller runs
there, so nothing but the agent itself can bring the copy back).

A switchover's `stop` step stops the old primary through its agent. When the runner
dies right after it (killed, or paused past its lease) nobody may ever call `start`:
the agent's stop holds only while the map stays where it was when the copy was stopped
(same epoch, same transition) and for a bound of the agent's own monotonic clock
(node_agent/supervisor.py `STOP_HOLD_IN_TRANSITION`); then the copy runs in its map role
again.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from deploy.cluster import Cluster
from failover import NodeAgents
from failover.switchover import resume_switchover, switchover
from tests.conftest import ADMIN_TOKEN
from tests.support import poll
from tests.test_promote import agent_copy, store_for, wait_copies_settled


class RunnerKilled(Exception):
    pass


@pytest.mark.timeout(300)
async def test_an_old_primary_stopped_by_a_switchover_whose_runner_died_runs_again(
        cluster: Cluster) -> None:
    before = await wait_copies_settled(cluster, "shard-b")
    old = before.primary_copy
    target = next(c for c in before.sync_standbys if c != old)

    async def killed_after_stop(step: str) -> None:
        if step == "stop":
            raise RunnerKilled(step)

    async def running_as_primary() -> dict[str, Any] | None:
        copy = await agent_copy(cluster, old, "shard-b")
        return copy if copy["running"] and copy["role"] == "primary" else None

    async with store_for(cluster) as store, NodeAgents(store, ADMIN_TOKEN) as agents:
        with pytest.raises(RunnerKilled):
            await switchover(store, agents, "shard-b", target, fault_hook=killed_after_stop)
        stopped = await agent_copy(cluster, old, "shard-b")
        assert not stopped["running"] and stopped["operatorStopped"], stopped
        held, _ = await store.read_shard("shard-b")
        assert held.transition is not None and held.primary_copy == old
        try:
            # Nobody runs the switchover again: the agent's hold runs out on its own clock.
            started = time.monotonic()
            copy = await poll(running_as_primary, f"{old} running again as the map's primary",
                              timeout=120)
            print(f"{old} running as primary again {time.monotonic() - started:.1f}s after the "
                  "switchover's runner died")
            assert isinstance(copy, dict) and copy["mapRole"] == "primary" and not copy["operatorStopped"]
        finally:  # tidy up: the journal and the transition
            report = await resume_switchover(store, agents, "shard-b")
            assert report is not None and report.resumed == "rolled-back", report
    after = await wait_copies_settled(cluster, "shard-b")
    assert after.primary_copy == old and after.epoch == before.epoch and after.transition is None
