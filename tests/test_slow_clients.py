"""A gateway survives slow and greedy clients (issue 21, item 5: slowloris).

One client address opens 5,000 connections to a running gateway and sends each a
partial request header (never the blank line that ends it); another opens some that
send nothing at all. While they are held open, a normal client (another address)
creates an event and books through that gateway, and a client of the second address
is still served. The partial-header connections are then closed by the gateway
(408 after the header-read timeout, or 503 at once beyond the per-address cap,
common/server.py and common/connections.py): the test polls until every one has
been closed, never sleeps. Distinct clients are distinct loopback addresses (Linux
routes all of 127/8 to the loopback interface).
"""

from __future__ import annotations

import asyncio
import resource
from urllib.parse import urlsplit

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.connections import DEFAULT_HEADER_TIMEOUT, PER_CLIENT_MIN
from deploy.cluster import Cluster
from tests.conftest import METRICS_AUTH
from tests.support import create_event, poll
from tests.support import gateway_url as gw

ATTACKER = "127.0.0.3"  # the slowloris client
OTHER = "127.0.0.4"  # a second client with a few idle connections of its own
ATTACK_CONNECTIONS = 5000
OTHER_CONNECTIONS = 50
PARTIAL = b"GET /api/health HTTP/1.1\r\nHost: gateway\r\nX-Slow: "  # no end of headers


def raise_own_fd_limit(needed: int) -> None:
    """This test process holds every connection's socket too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert max(soft, hard) > needed, f"this test needs {needed} file descriptors (hard limit {hard})"


async def hold(host: str, port: int, address: str, payload: bytes) -> asyncio.Task[bytes]:
    """Open a connection from `address`, send `payload`, and read until the gateway closes
    it (the task's result: every byte it answered)."""
    for _ in range(20):  # a full listen backlog: the SYN is retried, or the connect refused
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(address, 0))
            break
        except OSError:
            await asyncio.sleep(0.05)  # retry pacing, not synchronisation
    else:
        raise AssertionError(f"could not connect to {host}:{port} from {address}")
    if payload:
        writer.write(payload)

    async def until_closed() -> bytes:
        try:
            return await reader.read()
        except ConnectionError:
            return b"<reset>"
        finally:
            writer.close()

    return asyncio.create_task(until_closed())


async def open_many(host: str, port: int, address: str, count: int,
                    payload: bytes) -> list[asyncio.Task[bytes]]:
    tasks: list[asyncio.Task[bytes]] = []
    for start in range(0, count, 250):
        tasks += await asyncio.gather(*(hold(host, port, address, payload)
                                        for _ in range(min(250, count - start))))
    return tasks


async def refused_per_client(metrics_url: str) -> float:
    """The gateway's count of connections refused over the per-client cap."""
    async with aiohttp.ClientSession() as session, session.get(metrics_url, headers=METRICS_AUTH) as resp:
        text = await resp.text()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "boxoffice_http_connections_refused_total"
               and sample.labels.get("reason") == "per-client")


def client(address: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


@pytest.mark.timeout(600)  # 5,000 connections opened and read on a shared, loaded machine
async def test_thousands_of_slow_connections_do_not_stop_bookings(cluster: Cluster) -> None:
    raise_own_fd_limit(ATTACK_CONNECTIONS + OTHER_CONNECTIONS + 200)
    assert cluster.plan is not None
    gateway = gw(cluster, "east")
    split = urlsplit(gateway)
    host, port = split.hostname or "127.0.0.1", split.port or 80
    async with aiohttp.ClientSession() as normal:  # event made before the attack starts
        event = await create_event(normal, gateway, [10])

    metrics = f"http://127.0.0.1:{cluster.plan.gateway_metrics_ports['east']}/metrics"
    refused_before = await refused_per_client(metrics)

    slow = await open_many(host, port, ATTACKER, ATTACK_CONNECTIONS, PARTIAL)
    idle = await open_many(host, port, OTHER, OTHER_CONNECTIONS, b"")
    try:
        # A normal client books through the gateway the attack is held against ...
        async with aiohttp.ClientSession() as normal:
            body = {"eventId": event.id, "items": [{"ticketTierId": event.tier_ids[0], "quantity": 2}]}
            async with normal.post(f"{gateway}/api/bookings", json=body) as resp:
                booking = await resp.json()
                assert resp.status == 201, booking
            async with normal.get(f"{gateway}/api/events/{event.id}/ticket-tiers") as resp:
                assert resp.status == 200
                assert (await resp.json())["ticketTiers"][0]["remaining"] == 8
        # ... and so does the other address, under its own cap.
        async with client(OTHER) as other, other.get(f"{gateway}/api/health") as resp:
            assert resp.status == 200

        # Every partial-header connection is closed by the gateway: a 408 after the
        # header timeout, or a 503 at once beyond the per-address cap.
        async def all_closed() -> bool:
            return all(task.done() for task in slow + idle)

        await poll(all_closed, "the gateway closes every slow connection",
                   timeout=DEFAULT_HEADER_TIMEOUT + 60)
        answers = [task.result() for task in slow]
        timed_out = sum(a.startswith(b"HTTP/1.1 408") for a in answers)
        refused = sum(a.startswith(b"HTTP/1.1 503") for a in answers)
        assert timed_out + refused == ATTACK_CONNECTIONS, {a[:20] for a in answers}
        # Some were refused at once: the address holds at most its cap, 256 to 1024 (how
        # many is up to how fast they were opened: the slots of those that timed out
        # meanwhile were taken again); the others were held until the header timeout.
        assert refused > 0 and timed_out >= PER_CLIENT_MIN, (timed_out, refused)
        assert await refused_per_client(metrics) - refused_before >= refused
        # Connections that never sent a byte are closed too, without an answer.
        assert all(task.result() in (b"", b"<reset>") for task in idle)
    finally:
        for task in slow + idle:
            task.cancel()
        await asyncio.gather(*slow, *idle, return_exceptions=True)

    # The attacker's address is served again once its connections are gone.
    async with client(ATTACKER) as attacker, attacker.get(f"{gateway}/api/health") as resp:
        assert resp.status == 200
