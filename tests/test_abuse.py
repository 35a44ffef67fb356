"""Hostile clients against the real cluster: forged consistency tokens, probing the
operator surface, reading internals (issue: no client can hurt another)."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest

from deploy.cluster import Cluster
from gateway.consistency import COOKIE_NAME, HEADER_NAME, ConsistencyToken
from tests.conftest import ADMIN_TOKEN, METRICS_AUTH
from tests.support import create_event_doc
from tests.support import gateway_url as gw

PROBLEM = "application/problem+json"
REGIONS = ("east", "west")


class WaitSampler:
    """Samples a replica's sessions, counting those waiting for a consistency position."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.most = 0
        self.samples = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not self._stop.is_set():
                waiting = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND query LIKE '%boxoffice_wait_for_lsn%' AND pid <> pg_backend_pid()")
                self.most = max(self.most, int(waiting))
                self.samples += 1
                await asyncio.sleep(0.005)  # sampling interval
        finally:
            await conn.close()

    def stop(self) -> None:
        self._stop.set()


async def read_tiers_burst(url: str, n: int, headers: dict[str, str]) -> list[tuple[int, str]]:
    async with aiohttp.ClientSession() as s:
        async def one() -> tuple[int, str]:
            async with s.get(url, headers=headers) as resp:
                await resp.read()
                return resp.status, resp.headers.get("X-Boxoffice-Served-By", "")
        return await asyncio.gather(*(one() for _ in range(n)))


@pytest.mark.timeout(120)
async def test_forged_consistency_tokens_cost_no_replica_wait(cluster: Cluster) -> None:
    """200 reads carrying a forged far-ahead token are served by the local replica at
    once, as anonymous reads are: no replica session waits for a position. The control,
    a genuinely signed far-ahead token, does make the replica wait (so the sampler can see
    waits), then reads the primary."""
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gw(cluster, "east"), [10], shard="shard-a")
    replica = cluster.databases[("shard-a", "west")].dsn
    conn = await asyncpg.connect(replica)
    try:  # the west replica has the event (so a plain read is served there)
        for _ in range(500):
            if await conn.fetchval("SELECT 1 FROM events WHERE id = $1", uuid.UUID(event["id"])):
                break
            await asyncio.sleep(0.01)  # poll interval
    finally:
        await conn.close()
    url = f"{gw(cluster, 'west')}/api/events/{event['id']}/ticket-tiers"
    forged = {HEADER_NAME: "shard-a=FFFFFFFF/FFFFFFFF",
              "Cookie": f"{COOKIE_NAME}=v1:AAAAAAAAAAAAAAAAAAAAAA:shard-a=FFFFFFFF/FFFFFFFF"}

    sampler = WaitSampler(replica)
    task = asyncio.create_task(sampler.run())
    try:
        answers = await read_tiers_burst(url, 200, forged)
    finally:
        sampler.stop()
        await task
    assert answers == [(200, "west")] * 200
    assert sampler.samples > 0 and sampler.most == 0

    genuine = ConsistencyToken({"shard-a": 0xFFFFFFFF_FFFFFFFF - 1}).serialize(
        cluster.token_secret.encode())
    sampler = WaitSampler(replica)
    task = asyncio.create_task(sampler.run())
    try:
        answers = await read_tiers_burst(url, 20, {HEADER_NAME: genuine})
    finally:
        sampler.stop()
        await task
    assert answers == [(200, "east")] * 20  # the replica could not reach it: the primary
    assert sampler.most > 0


async def raw_get(url: str, header_lines: list[bytes]) -> int:
    """The status of a GET whose extra header lines go out as the bytes given (a client
    library would encode non-ASCII text its own way)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(b"GET " + parts.path.encode() + b" HTTP/1.1\r\nHost: " + parts.netloc.encode()
                     + b"\r\nConnection: close\r\n" + b"".join(h + b"\r\n" for h in header_lines)
                     + b"\r\n")
        await writer.drain()
        status_line = await reader.readline()
    finally:
        writer.close()
    return int(status_line.split()[1])


@pytest.mark.parametrize("header", [
    HEADER_NAME.encode() + b": v1:\xff\xfe:shard-a=0/1",
    HEADER_NAME.encode() + b": v2:\xff\xfe:shard-a=0/1@1",
    b"Cookie: " + COOKIE_NAME.encode() + b"=v1:\xff\xfe:shard-a=0/1",
    HEADER_NAME.encode() + b": v2:AAAAAAAAAAAAAAAAAAAAAA:shard-a=0/1@\xd9\xa1",
])
async def test_a_token_with_non_ascii_bytes_is_ignored_not_a_5xx(cluster: Cluster, header: bytes) -> None:
    """Issue 16: `X-Consistency-Token: v1:\\xff\\xfe:...` was a 500 (the MAC compared as
    UTF-8 of surrogates); now the token is ignored and the read served as an anonymous one."""
    async with aiohttp.ClientSession() as s:
        event = await create_event_doc(s, gw(cluster, "east"), [10], shard="shard-a")
    status = await raw_get(f"{gw(cluster, 'east')}/api/events/{event['id']}", [header])
    assert status == 200


@pytest.mark.parametrize("method,path", [
    ("GET", "/admin"), ("GET", "/admin/"), ("GET", "/admin/anything"), ("GET", "/admin/map"),
    ("POST", "/admin/events"), ("DELETE", "/admin/events/x"), ("GET", "/admin/shards/shard-a/promote"),
])
async def test_everything_under_admin_is_authenticated_before_routing(
        cluster: Cluster, method: str, path: str) -> None:
    async with aiohttp.ClientSession() as s:
        for region in REGIONS:
            url = f"{gw(cluster, region)}{path}"
            async with s.request(method, url) as resp:
                doc = await resp.json(content_type=None)
                assert resp.status == 401 and resp.content_type == PROBLEM, (region, doc)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            async with s.request(method, url, headers={"Authorization": "Bearer not-it"}) as resp:
                assert resp.status == 403 and resp.content_type == PROBLEM
            async with s.request(method, url, headers={"Authorization": "Basic abc"}) as resp:
                assert resp.status == 401
            async with s.request(method, url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
                # Past authentication, routing answers as usual (never a 5xx).
                assert resp.status < 500


async def test_the_booking_services_operator_routes_are_authenticated_before_routing(
        cluster: Cluster) -> None:
    assert cluster.plan is not None
    base = cluster.plan.service_url("east")
    async with aiohttp.ClientSession() as s:
        for path in ("/admin/nothing", "/shards/shard-a/admin/nothing", "/shards/shard-a/admin/events"):
            async with s.get(f"{base}{path}") as resp:
                assert resp.status == 401 and resp.content_type == PROBLEM


async def test_metrics_and_readiness_detail_are_not_public(cluster: Cluster) -> None:
    assert cluster.plan is not None
    async with aiohttp.ClientSession() as s:
        for region in REGIONS:
            async with s.get(f"{gw(cluster, region)}/metrics") as resp:
                assert resp.status == 404 and resp.content_type == PROBLEM
            async with s.get(f"{cluster.plan.service_url(region)}/metrics") as resp:
                assert resp.status == 404
            async with s.get(f"{gw(cluster, region)}/api/ready") as resp:
                assert await resp.json() == {"status": "ok"}
            async with s.get(f"{cluster.plan.service_url(region)}/shards/shard-a/api/ready") as resp:
                assert set(await resp.json()) == {"status"}
        for url in cluster.plan.metrics_urls().values():  # on their own listeners
            async with s.get(url) as resp:  # not without the scrape token
                assert resp.status == 401 and resp.content_type == PROBLEM
            async with s.get(url, headers=METRICS_AUTH) as resp:
                assert resp.status == 200 and "boxoffice_http_request_seconds" in await resp.text()
