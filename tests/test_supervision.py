"""Node agents keep every process of their host running in its map role (issue 7,
acceptance 5): `kill -9` of a Postgres server or of a booking service, and the cluster
keeps serving. Restart times are printed, not asserted (benchmarks hold timing goals)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from typing import Any

import aiohttp
import pytest

from deploy.cluster import Cluster
from tests.support import check_invariants, create_event_doc
from tests.support import gateway_url as gw


def copy_status(cluster: Cluster, host: str, shard: str) -> dict[str, Any]:
    doc = cluster.agent_call(host, "GET", "/agent/copies")
    return dict(next(c for c in doc["copies"] if c["shard"] == shard))


async def wait_restarted(cluster: Cluster, host: str, shard: str, old_pid: int, role: str,
                         timeout: float = 30.0) -> float:
    """Poll the host's agent until the copy runs again under a new pid in `role`."""
    started = time.monotonic()
    while True:
        status = await asyncio.to_thread(copy_status, cluster, host, shard)
        if status["running"] and status["pid"] not in (None, old_pid) and status["role"] == role:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"{shard}@{host} not back as {role}: {status}"
        await asyncio.sleep(0.02)  # poll interval


async def book(session: aiohttp.ClientSession, gateway: str, event: dict[str, Any]) -> int:
    async with session.post(f"{gateway}/api/bookings", json={
            "eventId": event["id"], "clientReference": f"sup-{uuid.uuid4()}",
            "items": [{"ticketTierId": event["tiers"][0]["id"], "quantity": 1}]}) as resp:
        await resp.read()
        return resp.status


@pytest.mark.timeout(120)
@pytest.mark.parametrize("host,role", [("west", "standby"), ("east", "primary")])
async def test_a_killed_postgres_comes_back_in_its_map_role(
        cluster: Cluster, host: str, role: str) -> None:
    """shard-a's replica in west, then its primary in east: SIGKILL (a host failure of
    the postmaster), and the agent starts it again in the role the map gives it; a
    booking sent meanwhile is held by the gateway's retries and lands once."""
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gw(cluster, "east"), [10], shard="shard-a")
        before = await asyncio.to_thread(copy_status, cluster, host, "shard-a")
        assert before["role"] == role and before["mapRole"] == role
        os.kill(before["pid"], signal.SIGKILL)
        booking = asyncio.create_task(book(s, gw(cluster, "west"), event))
        took = await wait_restarted(cluster, host, "shard-a", before["pid"], role)
        print(f"shard-a@{host} ({role}) back in its role {took:.2f}s after SIGKILL")
        assert await booking == 201
        assert await book(s, gw(cluster, "east"), event) == 201
    tiers = await check_invariants(cluster.databases[("shard-a", "east")].dsn, event["id"])
    assert tiers[event["tiers"][0]["id"]]["sold"] == 2


@pytest.mark.timeout(120)
async def test_a_killed_booking_service_is_started_again(cluster: Cluster) -> None:
    """The booking service of east's second zone (it serves shard-a's zone standby)."""
    host = "east/b"
    pid = await asyncio.to_thread(cluster.service_pid, host)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    while (new := await asyncio.to_thread(cluster.service_pid, host)) in (None, pid):
        assert time.monotonic() - started < 30, "the booking service was not started again"
        await asyncio.sleep(0.02)  # poll interval
    assert cluster.plan is not None
    url = f"{cluster.plan.service_url(host)}/shards/shard-a/api/ready"
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() - started < 30, "the restarted service never became ready"
            await asyncio.sleep(0.02)  # poll interval
    print(f"booking service {host} ready again {time.monotonic() - started:.2f}s after SIGKILL "
          f"(pid {pid} -> {new})")
