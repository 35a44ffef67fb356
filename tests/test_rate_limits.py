"""Per-client booking rate limits and load shedding on a real gateway process.

Each test starts an extra gateway (east) with tight limits on the `cluster` fixture's
Consul, map and booking services; the cluster's own gateways keep their loose test
limits. Distinct clients are distinct source addresses: Linux routes all of 127/8 to
the loopback interface, so a client bound to 127.0.0.2 and one bound to 127.0.0.3
are two clients to the gateway.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from deploy.cluster import Cluster
from deploy.procs import free_port
from deploy.services import python_process, wait_healthy
from tests.conftest import METRICS_AUTH
from tests.support import check_invariants, create_event_doc
from tests.support import gateway_url as gw

PROBLEM = "application/problem+json"
SHARD, HOME = "shard-a", "east"


@contextmanager
def extra_gateway(cluster: Cluster, log_dir: Path, limits: list[str]) -> Iterator[tuple[str, str]]:
    """A gateway process of region `east` with these protection flags, stopped afterwards:
    (its URL, its metrics listener's URL)."""
    assert cluster.plan is not None and cluster.consul is not None
    port, metrics_port = free_port(), free_port()
    args = [
        "--region", HOME, "--port", str(port), "--metrics-port", str(metrics_port),
        "--consul", f"127.0.0.1:{cluster.consul.http_port}",
        "--map-prefix", cluster.map_prefix,
        "--rewrites", json.dumps(cluster.plan.rewrites_for(HOME)),
        *limits,
    ]
    proc = python_process(f"gateway[{HOME}:{port}]", "gateway", args, log_dir / f"gateway-{port}.log",
                          env=cluster.component_env("gateway"))  # its keys, as the cluster's own
    proc.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, "extra gateway")
        yield url, f"http://127.0.0.1:{metrics_port}"
    finally:
        proc.stop()


async def metric(metrics_url: str, name: str, labels: dict[str, str]) -> float:
    """The sum of the process's Prometheus samples with these labels, whatever their other
    labels (0 when it has none yet)."""
    async with aiohttp.ClientSession() as session, \
            session.get(f"{metrics_url}/metrics", headers=METRICS_AUTH) as resp:
        text = await resp.text()
    return sum(float(sample.value) for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def client(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from `address` (a loopback address of its own)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def fresh_event(cluster: Cluster, gateway: str, capacity: int) -> tuple[str, str]:
    """An event on shard-a made through the cluster's gateway, once `gateway` routes it."""
    async with aiohttp.ClientSession() as session:
        doc = await create_event_doc(session, gw(cluster, HOME), [capacity], shard=SHARD)
        event_id, tier_id = doc["id"], doc["tiers"][0]["id"]

        async def routed() -> bool:
            async with session.get(f"{gateway}/api/events/{event_id}/ticket-tiers") as resp:
                return resp.status == 200

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not await routed():
            assert loop.time() < deadline, "the extra gateway never routed the new event"
            await asyncio.sleep(0.02)  # poll interval
    return event_id, tier_id


async def book(session: aiohttp.ClientSession, gateway: str, event_id: str, tier_id: str
               ) -> tuple[int, dict[str, str], Any]:
    body = {"eventId": event_id, "clientReference": f"rl-{uuid.uuid4()}",
            "items": [{"ticketTierId": tier_id, "quantity": 1}]}
    async with session.post(f"{gateway}/api/bookings", json=body) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


def assert_problem(status: int, headers: dict[str, str], doc: Any, want_status: int, want_type: str) -> None:
    assert status == want_status, doc
    assert headers["Content-Type"].startswith(PROBLEM)
    assert doc["status"] == want_status and doc["type"].endswith(f"/{want_type}"), doc
    assert doc.get("requestId"), doc
    retry_after = headers.get("Retry-After", "")
    assert retry_after.isdigit() and int(retry_after) >= 1, headers
    assert "127.0.0.1" not in json.dumps(doc)  # nothing internal in the answer


async def test_a_client_over_its_booking_limit_gets_429_while_another_client_books(
    cluster: Cluster, tmp_path: Path
) -> None:
    limits = ["--booking-rate", "2", "--booking-burst", "3",
              "--max-in-flight-reads", "0", "--max-in-flight-bookings", "0"]
    with extra_gateway(cluster, tmp_path, limits) as (gateway, metrics):
        event_id, tier_id = await fresh_event(cluster, gateway, capacity=500)
        async with client("127.0.0.2") as greedy, client("127.0.0.3") as other:
            loop = asyncio.get_running_loop()
            started = loop.time()
            answers = await asyncio.gather(*(book(greedy, gateway, event_id, tier_id) for _ in range(12)))
            elapsed = loop.time() - started
            statuses = [status for status, _, _ in answers]
            assert set(statuses) <= {201, 429}, statuses
            booked_greedy = statuses.count(201)
            # The burst, plus what the rate refilled meanwhile; the rest refused.
            assert 3 <= booked_greedy <= 3 + int(2 * elapsed) + 1, (statuses, elapsed)
            limited = [a for a in answers if a[0] == 429]
            assert limited, statuses
            for status, headers, doc in limited:
                assert_problem(status, headers, doc, 429, "rate-limited")

            # Another client through the same gateway is not affected.
            others = [await book(other, gateway, event_id, tier_id) for _ in range(3)]
            assert [status for status, _, _ in others] == [201, 201, 201], others

            # Retry-After is true: after waiting it (what a client is told to do), the
            # limited client books again.
            await asyncio.sleep(int(limited[0][1]["Retry-After"]))
            status, _, doc = await book(greedy, gateway, event_id, tier_id)
            assert status == 201, doc

        # Refused bookings wrote nothing: the tier sold exactly the bookings answered 201.
        tiers = await check_invariants(cluster.databases[(SHARD, HOME)].dsn, event_id)
        assert tiers[tier_id]["sold"] == booked_greedy + 3 + 1
        assert await metric(metrics, "boxoffice_rate_limited_total", {"process": "gateway"}) == len(limited)


async def test_reads_are_shed_with_503_while_bookings_go_through(cluster: Cluster, tmp_path: Path) -> None:
    # Two reads at a time and no queue for reads; bookings may queue for 5 s.
    limits = ["--booking-rate", "0", "--max-in-flight-reads", "2", "--read-queue-ms", "0",
              "--max-in-flight-bookings", "4", "--booking-queue-ms", "5000"]
    with extra_gateway(cluster, tmp_path, limits) as (gateway, metrics):
        event_id, tier_id = await fresh_event(cluster, gateway, capacity=100)
        async with client("127.0.0.4") as readers, client("127.0.0.5") as buyer:

            async def read() -> tuple[int, dict[str, str], Any]:
                async with readers.get(f"{gateway}/api/events/{event_id}/ticket-tiers") as resp:
                    return resp.status, dict(resp.headers), await resp.json(content_type=None)

            async def probe(path: str) -> int:
                async with readers.get(f"{gateway}{path}") as resp:
                    return resp.status

            reads = [asyncio.create_task(read()) for _ in range(80)]
            bookings = [asyncio.create_task(book(buyer, gateway, event_id, tier_id)) for _ in range(6)]
            probes = [asyncio.create_task(probe(p)) for p in ("/api/health", "/api/ready") * 5]
            read_answers = await asyncio.gather(*reads)
            booking_answers = await asyncio.gather(*bookings)
            assert set(await asyncio.gather(*probes)) == {200}  # health and readiness are never shed

        read_statuses = [status for status, _, _ in read_answers]
        assert set(read_statuses) <= {200, 503}, read_statuses
        shed = [a for a in read_answers if a[0] == 503]
        assert shed, "80 concurrent reads with 2 slots and no queue: some must be shed"
        assert read_statuses.count(200) >= 2
        for status, headers, doc in shed:
            assert_problem(status, headers, doc, 503, "overloaded")
        assert [status for status, _, _ in booking_answers] == [201] * 6, booking_answers

        # Each booking was written once, and nothing more.
        tiers = await check_invariants(cluster.databases[(SHARD, HOME)].dsn, event_id)
        assert tiers[tier_id]["sold"] == 6 and tiers[tier_id]["remaining"] == 94

        # Operators see it: the gateway counts what it shed, by class.
        shed_metric = await metric(metrics, "boxoffice_shed_total", {"process": "gateway", "class": "read"})
        assert shed_metric == len(shed)
