"""Issue 6, item 6: paging through GET /api/events lists every placed event exactly once,
in (startsAt, id) order, and ends, even with fractional-second start times (several in
the same whole second, on both shards) and with unplaced copies on a shard (events that
exist on the shard's database but are not placed there in the map)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime

import aiohttp
import asyncpg
import pytest

from common.cursor import parse_timestamp
from deploy.cluster import Cluster
from tests.support import create_event_doc
from tests.support import gateway_url as gw

SECOND = "2031-05-17T20:00:"
# (shard, startsAt) of the placed events: shared whole seconds, fractions on both shards.
PLACED = [
    ("shard-a", SECOND + "00Z"), ("shard-b", SECOND + "00.25Z"), ("shard-a", SECOND + "00.5Z"),
    ("shard-b", SECOND + "00.5Z"), ("shard-a", SECOND + "00.500001Z"),
    ("shard-b", SECOND + "00.999999Z"), ("shard-a", SECOND + "01Z"), ("shard-b", SECOND + "01.000001Z"),
]
# Unplaced copies on shard-a, just before its placed events: under the old per-shard LIMIT
# they filled shard-a's page and pushed its placed events off.
UNPLACED = [SECOND + "00.1Z", SECOND + "00.2Z", SECOND + "00.3Z", SECOND + "00.4Z"]
Position = tuple[datetime, uuid.UUID]


@pytest.fixture(scope="module")
async def events(cluster: Cluster) -> tuple[set[str], set[str]]:
    """(placed ids, unplaced ids), every one visible on every copy of its shard."""
    assert cluster.plan is not None
    token = cluster.admin_token
    async with aiohttp.ClientSession() as s:
        placed = {(await create_event_doc(s, gw(cluster, "east"), [5], shard=shard, starts_at=start,
                                          token=token))["id"] for shard, start in PLACED}
        home = cluster.topology.shards["shard-a"]
        service = f"{cluster.plan.service_url(home)}/shards/shard-a"
        unplaced = {(await create_event_doc(s, service, [5], starts_at=start, token=token))["id"]
                    for start in UNPLACED}
    await _wait_replicated(cluster, placed | unplaced)
    return placed, unplaced


async def _event_ids(dsn: str) -> dict[uuid.UUID, datetime]:
    """The events the public listing shows: other tests' unlisted ones (drills, the
    unlisted-flag test) share the session cluster and are never listed."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, starts_at FROM events WHERE NOT unlisted")
        return {r["id"]: r["starts_at"] for r in rows}
    finally:
        await conn.close()


async def _wait_replicated(cluster: Cluster, ids: set[str], timeout: float = 15.0) -> None:
    """Until every copy of each shard holds what its primary holds, all of `ids` among
    them (reads of the listing go to the nearest copy)."""
    deadline = time.monotonic() + timeout
    wanted = {uuid.UUID(i) for i in ids}
    while True:
        primaries = {shard: set(await _event_ids(cluster.databases[(shard, home)].dsn))
                     for shard, home in cluster.topology.shards.items()}
        copies = {key: set(await _event_ids(db.dsn)) for key, db in cluster.databases.items()}
        if wanted <= set().union(*primaries.values()) and all(
                held == primaries[shard] for (shard, _), held in copies.items()):
            return
        assert time.monotonic() < deadline, "the replicas did not catch up"
        await asyncio.sleep(0.05)


async def _placed_in_order(cluster: Cluster) -> list[Position]:
    """What the listing must show: the events on each shard's primary that the map places
    on that shard, in (startsAt, id) order."""
    async with aiohttp.ClientSession() as s, s.get(
            f"{gw(cluster, 'east')}/admin/map",
            headers={"Authorization": f"Bearer {cluster.admin_token}"}) as resp:
        placements = (await resp.json())["placements"]
    expected: list[Position] = []
    for shard, home in cluster.topology.shards.items():
        for event_id, starts_at in (await _event_ids(cluster.databases[(shard, home)].dsn)).items():
            if placements.get(str(event_id)) == shard:
                expected.append((starts_at, event_id))
    return sorted(expected)


async def _page_through(base_url: str, limit: int, max_pages: int) -> list[Position]:
    listed: list[Position] = []
    cursor: str | None = None
    async with aiohttp.ClientSession() as s:
        for _ in range(max_pages):
            params = {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
            async with s.get(f"{base_url}/api/events", params=params) as resp:
                page = await resp.json()
                assert resp.status == 200, page
            assert len(page["events"]) <= limit
            for event in page["events"]:
                starts_at = parse_timestamp(event["startsAt"])
                assert starts_at is not None, event["startsAt"]
                listed.append((starts_at, uuid.UUID(event["id"])))
            cursor = page["nextCursor"]
            if cursor is None:
                return listed
    raise AssertionError(f"paging with limit {limit} did not end within {max_pages} pages")


@pytest.mark.parametrize("limit", [1, 2, 3])
@pytest.mark.parametrize("region", ["east", "west"])
async def test_paging_lists_every_placed_event_once_in_order(
        cluster: Cluster, events: tuple[set[str], set[str]], limit: int, region: str) -> None:
    placed, unplaced = events
    expected = await _placed_in_order(cluster)
    listed = await _page_through(gw(cluster, region), limit, max_pages=len(expected) + 2)
    assert listed == expected
    listed_ids = {str(event_id) for _, event_id in listed}
    assert placed <= listed_ids and not (unplaced & listed_ids)


async def test_start_times_keep_their_fraction(cluster: Cluster,
                                               events: tuple[set[str], set[str]]) -> None:
    placed, _ = events
    starts = set()
    async with aiohttp.ClientSession() as s:
        for event_id in placed:
            async with s.get(f"{gw(cluster, 'west')}/api/events/{event_id}") as resp:
                starts.add((await resp.json())["startsAt"])
    assert starts == {"2031-05-17T20:00:00Z", "2031-05-17T20:00:00.250000Z",
                      "2031-05-17T20:00:00.500000Z", "2031-05-17T20:00:00.500001Z",
                      "2031-05-17T20:00:00.999999Z", "2031-05-17T20:00:01Z",
                      "2031-05-17T20:00:01.000001Z"}
